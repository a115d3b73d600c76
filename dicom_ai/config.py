"""The node's configuration: one validated object loaded from YAML, passed explicitly.

With no file the node runs on the embedded defaults below; every field is documented in the
README. Paths in a file are relative to that file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from dicom_ai.yaml_model import load_validated

__all__ = [
    "BUILTIN_MODELS",
    "Config",
    "DeliveryConfig",
    "DestinationConfig",
    "ModelConfig",
    "NodeConfig",
    "PipelineConfig",
    "load_config",
]

REPO_RULES = Path(__file__).resolve().parent.parent / "rules" / "default.yaml"
BUILTIN_MODELS = frozenset({"ct-body"})

# AE titles: 1-16 characters of the default repertoire, no backslash (PS3.5 6.2, VR AE).
AETitle = Annotated[
    str,
    StringConstraints(min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]*\S[^\\\x00-\x1f]*$"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Strict):
    ae_title: AETitle = "DICOM_AI"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Path("./dicom-ai-data")
    max_associations: int = Field(default=10, ge=1)
    # C-STORE answers 0xA700 below this much free space on the spool's filesystem.
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Device Serial Number of the results; default is the AE title.
    node_id: str | None = None


class DestinationConfig(_Strict):
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class ModelConfig(_Strict):
    bundle: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_seconds: float = Field(default=600.0, gt=0)


class PipelineConfig(_Strict):
    workers: int = Field(default=1, ge=1)
    quiet_seconds: float = Field(default=5.0, gt=0)
    release_grace_seconds: float = Field(default=1.0, ge=0)
    # A job whose worker died (crash, kill) this many times is failed, not retried again.
    max_job_attempts: int = Field(default=3, ge=1)


class DeliveryConfig(_Strict):
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    timeout_seconds: float = Field(default=30.0, gt=0)


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    destinations: dict[str, DestinationConfig] = Field(
        default_factory=lambda: {
            "pacs": DestinationConfig(ae_title="PACS", host="127.0.0.1", port=4242)
        }
    )
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    rules: Path = REPO_RULES
    pipeline: PipelineConfig = PipelineConfig()
    delivery: DeliveryConfig = DeliveryConfig()

    @model_validator(mode="after")
    def _models_resolve(self) -> Config:
        for model_id, model in self.models.items():
            if model.bundle is None and model_id not in BUILTIN_MODELS:
                raise ValueError(
                    f"model {model_id!r} has no bundle and is not built in "
                    f"(built in: {', '.join(sorted(BUILTIN_MODELS))})"
                )
        for name in self.destinations:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"destination name {name!r}: use letters, digits, '_', '.', '-'")
        return self

    def model(self, model_id: str) -> ModelConfig:
        """The config of a model id; built-in ids need no entry."""
        if model_id in self.models:
            return self.models[model_id]
        if model_id in BUILTIN_MODELS:
            return ModelConfig()
        raise KeyError(model_id)

    def known_models(self) -> frozenset[str]:
        return BUILTIN_MODELS | frozenset(self.models)

    @property
    def device_serial_number(self) -> str:
        return self.node.node_id or self.node.ae_title


def _resolve(config: Config, base: Path) -> Config:
    """Paths in a file are relative to the file's folder."""

    def fix(path: Path) -> Path:
        return path if path.is_absolute() else (base / path).resolve()

    models = {
        k: m.model_copy(update={"bundle": fix(m.bundle)}) if m.bundle else m
        for k, m in config.models.items()
    }
    node = config.node.model_copy(update={"data_dir": fix(config.node.data_dir)})
    return config.model_copy(update={"node": node, "models": models, "rules": fix(config.rules)})


def load_config(path: Path | None) -> Config:
    """The config in ``path``, or the embedded defaults; raises ConfigError naming file:line."""
    if path is None:
        config = Config()
        return config.model_copy(
            update={
                "node": config.node.model_copy(update={"data_dir": config.node.data_dir.resolve()})
            }
        )
    return _resolve(load_validated(path, Config), path.resolve().parent)

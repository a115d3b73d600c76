"""The node's configuration: one validated object loaded from YAML, passed explicitly.

With no file the node runs on the embedded defaults below; every field is documented in the
README. Paths in a file are relative to that file's folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.resources import files
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from dicom_ai.yaml_model import load_validated

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_RULES",
    "SENDER",
    "CalledAEConfig",
    "ClientTLSConfig",
    "Config",
    "DeliveryConfig",
    "DestinationConfig",
    "DicomDestination",
    "DicomWebDestination",
    "ModelConfig",
    "NodeConfig",
    "PipelineConfig",
    "RayConfig",
    "ResultsConfig",
    "ServerTLSConfig",
    "StorageConfig",
    "WebConfig",
    "WebTLSConfig",
    "WebhookConfig",
    "WebhookEvent",
    "bind_sender",
    "bound_sender",
    "load_config",
]

# The rules a node without `rules` routes with. They ship inside the package, so an installed
# wheel has them; a Path, not a resource stream, because the node watches the file's mtime
# (the package is installed as plain files, never imported from a zip).
DEFAULT_RULES = Path(str(files("dicom_ai").joinpath("default_rules.yaml")))
BUILTIN_MODELS = frozenset({"ct-body", "mr-brain"})
# The destination that means "whoever sent the series": resolved through `senders`. A job's
# delivery records it bound to the calling AE that sent the series: "sender:CT_SCANNER_1".
SENDER = "sender"


def bind_sender(destination: str, calling_ae: str) -> str:
    return f"{SENDER}:{calling_ae}" if destination == SENDER else destination


def bound_sender(destination: str) -> str | None:
    """The calling AE of a bound ``sender`` destination, else None."""
    prefix = f"{SENDER}:"
    return destination[len(prefix) :] if destination.startswith(prefix) else None


# AE titles: 1-16 characters of the default repertoire, no backslash (PS3.5 6.2, VR AE).
# Leading and trailing spaces are not significant on the wire, so they are refused here.
AETitle = Annotated[
    str,
    StringConstraints(min_length=1, max_length=16, pattern=r"^[^\\\s](?:[^\\\x00-\x1f]*[^\\\s])?$"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerTLSConfig(_Strict):
    """DICOM TLS listener beside the plain one (PS3.15 B.1): its own port."""

    port: int = Field(ge=0, le=65535)
    certificate: Path
    private_key: Path
    # CA certificates that client certificates are verified against.
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ServerTLSConfig:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class ClientTLSConfig(_Strict):
    # None: the system's CA store.
    ca_certificates: Path | None = None
    # Our own certificate, for peers that require one.
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> ClientTLSConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class NodeConfig(_Strict):
    ae_title: AETitle = "DICOM_AI"
    host: str = "0.0.0.0"
    # Plain TCP port; null: listen on TLS only.
    port: int | None = Field(default=11112, ge=0, le=65535)
    tls: ServerTLSConfig | None = None
    data_dir: Path = Path("./dicom-ai-data")
    max_associations: int = Field(default=10, ge=1)
    # Processes that receive, the node's own included: they accept on its listening
    # socket(s), so concurrent associations are received on several cores (README Speed).
    receivers: int = Field(default=2, ge=1, le=32)
    # Who runs the wire: the node's own acceptor, or pynetdicom's (slower data phase; the
    # reference it is tested and measured against, benchmarks.ingest --acceptor).
    acceptor: Literal["fast", "pynetdicom"] = "fast"
    # An association silent this long is aborted; a connection that sends no association
    # request within acse_timeout_seconds is closed (the ARTIM timer).
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    # C-STORE answers 0xA700 below this much free space on the spool's filesystem.
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Device Serial Number of the results; default is the AE title.
    node_id: str | None = None

    @model_validator(mode="after")
    def _listens(self) -> NodeConfig:
        if self.port is None and self.tls is None:
            raise ValueError("set port, tls, or both: the node must listen somewhere")
        if self.tls is not None and self.port is not None and self.tls.port == self.port != 0:
            raise ValueError("tls.port must differ from port")
        return self


class CalledAEConfig(_Strict):
    """One AE title the node answers to, with its own rules and who may call it."""

    rules: Path
    # Empty: any calling AE title.
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    # Addresses or networks (CIDR); empty: any address.
    allowed_addresses: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    # Refuse associations to this title on the plain port: TLS only.
    require_tls: bool = False


class DicomDestination(_Strict):
    """A DIMSE peer: results go by C-STORE."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: ClientTLSConfig | None = None


class DicomWebDestination(_Strict):
    """A DICOMweb origin server: results go by STOW-RS to ``url`` (the service root)."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
    # For https: CA certificates to verify the server with; None: requests' default bundle
    # (certifi, or REQUESTS_CA_BUNDLE when set).
    ca_certificates: Path | None = None


def _destination_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "dicomweb" if "url" in value else "dicom"
    return "dicomweb" if isinstance(value, DicomWebDestination) else "dicom"


DestinationConfig = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


class ModelConfig(_Strict):
    bundle: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_seconds: float = Field(default=600.0, gt=0)
    # What the model outputs; None: read from the bundle's metadata.json (outputs.pred).
    task: Literal["segmentation", "classification", "detection", "landmarks"] | None = None
    # Classes and detections with a probability at or above this are reported as found.
    threshold: float = Field(default=0.5, ge=0, le=1)
    # A bundle's config files (under its configs/), merged in order as MONAI's runner does;
    # empty: its inference.json / inference.yaml.
    config_files: list[str] = Field(default_factory=list)
    # A promptable bundle's label prompts (label ids); None: every class its metadata lists.
    prompts: list[int] | None = None
    # Label value -> name, replacing the bundle metadata's names (brats: its postprocessing
    # writes 1, 2, 4 where the metadata names channels 0..2); None: the metadata's.
    labels: dict[int, str] | None = None
    # Jobs of this model running at once, at most (a GPU's memory); None: as many as workers.
    max_concurrent: int | None = Field(default=None, ge=1)
    # Classification and detection: also an attribution map of what the model looked at
    # (a Parametric Map and a colour overlay preview); off: none. It costs a backward pass
    # (gradcam, gradcampp) or many forward passes (occlusion).
    explain: Literal["off", "gradcam", "gradcampp", "occlusion"] = "off"
    # The network layer GradCAM reads (a dotted module name, e.g. "features.denseblock4");
    # None: the last convolution of the network.
    explain_layer: str | None = None
    # With pipeline.executor ray: what one replica needs on a cluster node (Ray resources:
    # num_cpus, num_gpus, memory in bytes, and custom ones such as model_host), and how
    # many warm replicas (Ray actors) the cluster holds.
    resources: dict[str, float] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=1)

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        negative = sorted(name for name, amount in value.items() if amount < 0)
        if negative:
            raise ValueError(f"resources cannot be negative: {', '.join(negative)}")
        # Ray takes these only as its own options.
        if "CPU" in value or "GPU" in value:
            raise ValueError("resources: write num_cpus and num_gpus, not CPU and GPU")
        return value

    @field_validator("explain", mode="before")
    @classmethod
    def _explain_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false.
        return "off" if value is False else value


class RayConfig(_Strict):
    """An existing Ray cluster the models run on (pipeline.executor ray); the node does not
    start it."""

    # The cluster's GCS address (`ray start --head --port ...`), host:port.
    address: Annotated[str, StringConstraints(pattern=r"^\S+:\d{1,5}$")] = "127.0.0.1:6379"
    namespace: Annotated[str, StringConstraints(min_length=1)] = "dicom-ai"


class PipelineConfig(_Strict):
    # local: spawned worker processes on this machine (`workers`); ray: the models' replicas
    # on a Ray cluster (`ray`, and each model's resources and replicas).
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()
    workers: int = Field(default=1, ge=1)
    quiet_seconds: float = Field(default=5.0, gt=0)
    release_grace_seconds: float = Field(default=1.0, ge=0)
    # A series one association sent (and released) starts its run at once; its results are
    # held for the grace and dropped if more of the series comes (assembly.py).
    early_start: bool = True
    # A job whose worker died (crash, kill) this many times is failed, not retried again.
    max_job_attempts: int = Field(default=3, ge=1)
    # Memory each worker touches ahead while idle, once it has been sent a first series
    # (prefetch or job), for the series it decodes next (320: a 300-slice 512x512 CT as
    # float32). 0: none.
    warm_memory_mb: int = Field(default=320, ge=0)
    # Models each worker keeps loaded, the most recently used; a job goes to an idle worker
    # that has its model loaded, so an urgent job seldom waits for a model load.
    warm_models: int = Field(default=2, ge=1)


class ResultsConfig(_Strict):
    """What the result objects say besides the findings."""

    # Printed at the foot of every result card (rules' ``card: true``).
    card_disclaimer: str = Field(
        default=(
            "Produced by an AI model. Not a diagnosis: to be reviewed by a qualified physician."
        ),
        max_length=300,
    )
    # Also send the card as an Encapsulated PDF.
    card_pdf: bool = False


class DeliveryConfig(_Strict):
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    timeout_seconds: float = Field(default=30.0, gt=0)


class StorageConfig(_Strict):
    """Retention: what the cleaner deletes, and when (store/retention.py). Nothing that
    is not yet delivered is ever deleted, whatever these say."""

    # A series' received instances, counted from when all its jobs' results were delivered
    # (or a rule routed it to no model).
    keep_sources_hours: float = Field(default=24.0, ge=0)
    # Result objects, counted from delivery.
    keep_results_hours: float = Field(default=168.0, ge=0)
    # Series no rule claimed, counted from routing.
    keep_unrouted_hours: float = Field(default=24.0, ge=0)
    # Index rows (series, jobs, deliveries, associations, events) whose files are gone,
    # counted from their last change.
    keep_records_days: float = Field(default=90.0, ge=0)
    cleanup_interval_seconds: float = Field(default=60.0, gt=0)
    # Below this much free space on the spool's filesystem, the oldest deletable sources and
    # results go first, whatever their age; null: never. Set it above node.min_free_bytes,
    # where C-STORE starts answering 0xA700.
    emergency_free_bytes: int | None = Field(default=None, ge=0)


class WebTLSConfig(_Strict):
    certificate: Path
    private_key: Path


class WebConfig(_Strict):
    """The operator's console: web pages, REST API, /metrics, /healthz (dicom_ai/web)."""

    enabled: bool = True
    # Loopback by default: an operator opens the console to the network on purpose.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls: WebTLSConfig | None = None
    # When set, /metrics asks for ``Authorization: Bearer <metrics_token>``.
    metrics_token: str | None = None
    session_hours: float = Field(default=12.0, gt=0)
    # Failed logins from one address or for one user name before logins pause.
    login_attempts: int = Field(default=5, ge=1)
    login_pause_seconds: float = Field(default=300.0, gt=0)


WebhookEvent = Literal["job.done", "job.failed", "delivery.dead_letter"]


def _every_event() -> list[WebhookEvent]:
    return ["job.done", "job.failed", "delivery.dead_letter"]


class WebhookConfig(_Strict):
    """A JSON POST per event, signed with HMAC-SHA256 of the body under ``secret``."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
    events: list[WebhookEvent] = Field(default_factory=_every_event, min_length=1)
    secret: Annotated[str, StringConstraints(min_length=1)]
    timeout_seconds: float = Field(default=10.0, gt=0)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)


_DEFAULT_PACS: DicomDestination | DicomWebDestination = DicomDestination(
    ae_title="PACS", host="127.0.0.1", port=4242
)


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    destinations: dict[str, DestinationConfig] = Field(
        default_factory=lambda: {"pacs": _DEFAULT_PACS}
    )
    # Where each calling AE title listens, for the destination `sender` (DICOM does not
    # carry the sender's port).
    senders: dict[AETitle, DicomDestination] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    # The rules of the node's one AE title, when `called_aes` is empty.
    rules: Path = DEFAULT_RULES
    # Several AE titles, each with its own rules and access list. When set, only these
    # titles are answered and `rules` is not used.
    called_aes: dict[AETitle, CalledAEConfig] = Field(default_factory=dict)
    pipeline: PipelineConfig = PipelineConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    results: ResultsConfig = ResultsConfig()
    storage: StorageConfig = StorageConfig()
    web: WebConfig = WebConfig()
    webhooks: list[WebhookConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _models_resolve(self) -> Config:
        for model_id, model in self.models.items():
            if model.bundle is None and model_id not in BUILTIN_MODELS:
                raise ValueError(
                    f"model {model_id!r} has no bundle and is not built in "
                    f"(built in: {', '.join(sorted(BUILTIN_MODELS))})"
                )
            bundle_only = sorted({"task", "threshold"} & model.model_fields_set)
            if model.bundle is None and bundle_only:
                raise ValueError(
                    f"model {model_id!r}: {', '.join(bundle_only)} apply to bundles; the "
                    "built-in models are segmentations with fixed settings"
                )
        for name in self.destinations:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"destination name {name!r}: use letters, digits, '_', '.', '-'")
            if name == SENDER:
                raise ValueError(f"destination name {SENDER!r} is reserved for return to sender")
        emergency = self.storage.emergency_free_bytes
        if emergency is not None and emergency <= self.node.min_free_bytes:
            raise ValueError(
                f"storage.emergency_free_bytes ({emergency}) must be above node.min_free_bytes "
                f"({self.node.min_free_bytes}): the cleaner must free space before C-STORE "
                "refuses for lack of it"
            )
        if self.called_aes and "rules" in self.model_fields_set:
            raise ValueError("with called_aes, give each AE title its rules; drop top-level rules")
        return self

    def called_ae_table(self) -> dict[str, CalledAEConfig]:
        """Every AE title the node answers to; without `called_aes`, just its own."""
        if self.called_aes:
            return dict(self.called_aes)
        return {self.node.ae_title: CalledAEConfig(rules=self.rules)}

    def has_destination(self, name: str) -> bool:
        return name == SENDER or name in self.destinations

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


def _resolve_paths(value: Any, base: Path) -> Any:
    """Every Path in the config, made absolute against ``base`` (the file's folder)."""
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value).resolve()
    if isinstance(value, BaseModel):
        updates = {
            name: _resolve_paths(getattr(value, name), base) for name in type(value).model_fields
        }
        return value.model_copy(update=updates)
    if isinstance(value, dict):
        return {k: _resolve_paths(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_paths(v, base) for v in value]
    return value


def load_config(path: Path | None) -> Config:
    """The config in ``path``, or the embedded defaults; raises ConfigError naming file:line.

    Paths in a file are relative to the file's folder; the defaults' to the working folder.
    """
    if path is None:
        resolved: Config = _resolve_paths(Config(), Path.cwd())
        return resolved
    config = load_validated(path, Config)
    resolved = _resolve_paths(config, path.resolve().parent)
    return resolved

"""docker/: the compose file, Orthanc's config, its forwarder and the node's config agree.

No Docker engine is needed: the files are read as data. What the containers do with them is
exercised on loopback by tests/delivery/test_orthanc_pacs.py.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dicom_ai.cli import app
from dicom_ai.config import DEFAULT_RULES, Config, DicomDestination, load_config
from dicom_ai.node import check_rules_against_config
from dicom_ai.routing.engine import load_rules
from tests.markers import uses
from tests.orthanc_setup import (
    FORWARD_LUA,
    ORTHANC_JSON,
    docker_orthanc_config,
    node_modality,
    node_modality_name,
    orthanc_settings,
)
from tests.peers import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
NODE_YAML = DOCKER / "node.yaml"
ORTHANC_SERVICE = "orthanc"
NODE_SERVICE = "dicom-ai"


# --- reading the files ----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}: {sorted(services)}"
    service: dict[str, Any] = services[name]
    return service


def _container_ports(service: dict[str, Any], published_only: bool = False) -> set[int]:
    """Container-side ports of `ports` (short or long syntax) and, unless told, `expose`."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    if not published_only:
        ports.update(int(str(e).split("/")[0]) for e in service.get("expose", []))
    return ports


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a path relative to compose.yaml, or a volume name)."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[str(entry["target"])] = str(entry["source"])
        else:
            source, target = str(entry).split(":")[:2]
            mounts[target] = source
    return mounts


def _node_config() -> Config:
    return load_config(NODE_YAML)


def _pacs(config: Config) -> DicomDestination:
    pacs = config.destinations["pacs"]
    assert isinstance(pacs, DicomDestination), pacs
    return pacs


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            out.append((instruction.upper(), arguments.strip()))
    return out


def _instructions(name: str) -> list[str]:
    return [arguments for instruction, arguments in _dockerfile() if instruction == name]


def _shell_commands(script: str) -> list[str]:
    return [c.strip() for c in re.split(r"&&|\|\||;", script) if c.strip()]


def _readme_first_command() -> list[str]:
    """The first command of the README's first fenced code block, split at ``&&``."""
    block = re.search(r"^```[^\n]*\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    assert block is not None, "README.md has no fenced code block"
    first = block.group(1).strip().splitlines()[0]
    return _shell_commands(first)


def _cmd() -> list[str]:
    (cmd,) = _instructions("CMD")
    argv = json.loads(cmd)  # exec form: no shell between Docker and the node
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), cmd
    return argv


def _image_to_repo(container_path: str) -> Path:
    """A path inside the node image -> the repository file that a COPY put there."""
    workdir = PurePosixPath(_instructions("WORKDIR")[-1])
    path = PurePosixPath(posixpath.normpath(workdir / container_path))
    for copy in _instructions("COPY"):
        *sources, destination = [a for a in shlex.split(copy) if not a.startswith("--")]
        target = PurePosixPath(posixpath.normpath(workdir / destination))
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in sources:
            source_path = (REPO / source).resolve()
            if source_path.is_dir() and path.is_relative_to(target):
                # A directory's contents are copied into the destination.
                candidate = source_path / path.relative_to(target)
                if candidate.is_file():
                    return candidate
            elif source_path.is_file():
                copied_to = target / source_path.name if into_directory else target
                if path == copied_to:
                    return source_path
    raise AssertionError(f"{container_path}: no COPY in the Dockerfile puts it in the image")


# --- the node <-> Orthanc wiring ----------------------------------------------------------


def test_forward_lua_targets_the_node_entry_of_orthanc_json() -> None:
    name = node_modality_name()
    assert name in docker_orthanc_config()["DicomModalities"], name
    lua = FORWARD_LUA.read_text()
    assert "function OnStableSeries(seriesId, tags, metadata)" in lua
    assert re.search(r"SendToModality\(\w+, NODE_MODALITY\)", lua), "sends elsewhere"
    assert re.search(r"RESULT_MODALITIES = \{ SEG = true, SR = true \}", lua)
    assert "metadata['RemoteAET']" in lua


def test_orthanc_calls_the_node_by_its_ae_title_service_and_port() -> None:
    ae_title, host, port = node_modality(docker_orthanc_config())
    node = _node_config().node
    assert ae_title == node.ae_title
    assert host == NODE_SERVICE and host in _compose()["services"]
    assert port == node.port
    assert _container_ports(_service(NODE_SERVICE)) == {node.port, _node_config().web.port}
    assert str(node.port) in _instructions("EXPOSE")[0].split()
    assert node.host == "0.0.0.0", "in a container the node must listen on all interfaces"


def test_the_console_is_published_on_the_hosts_loopback_only() -> None:
    web = _node_config().web
    assert web.enabled and web.host == "0.0.0.0"  # inside the container
    ports = _service(NODE_SERVICE)["ports"]
    assert f"127.0.0.1:{web.port}:{web.port}" in ports
    assert str(web.port) in _instructions("EXPOSE")[0].split()


def test_node_sends_results_to_orthanc_by_its_ae_title_service_and_port() -> None:
    orthanc = docker_orthanc_config()
    pacs = _pacs(_node_config())
    assert pacs.ae_title == orthanc["DicomAet"]
    assert pacs.host == ORTHANC_SERVICE
    assert pacs.port == orthanc["DicomPort"]
    published = _container_ports(_service(ORTHANC_SERVICE), published_only=True)
    assert published == {orthanc["DicomPort"], orthanc["HttpPort"]}


def test_compose_mounts_orthanc_config_and_lua_where_orthanc_reads_them() -> None:
    orthanc = docker_orthanc_config()
    service = _service(ORTHANC_SERVICE)
    assert "orthanc" in service["image"] and re.search(r":\d+\.\d+\.\d+$", service["image"])
    mounts = _mounts(service)
    # jodogne/orthanc-plugins runs `Orthanc /etc/orthanc/`: every .json file there.
    assert (DOCKER / mounts["/etc/orthanc/orthanc.json"]).resolve() == ORTHANC_JSON
    (lua_path,) = orthanc["LuaScripts"]
    assert (DOCKER / mounts[lua_path]).resolve() == FORWARD_LUA
    assert mounts.get(orthanc["StorageDirectory"]) in _compose()["volumes"]
    assert orthanc["IndexDirectory"] == orthanc["StorageDirectory"]
    assert orthanc["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"}
    assert any("plugins" in p for p in orthanc["Plugins"])
    assert 0 < orthanc["StableAge"] <= 10, "results seconds after the scan, not a minute"


def test_node_service_builds_this_dockerfile_and_keeps_its_data() -> None:
    service = _service(NODE_SERVICE)
    context = (DOCKER / service["build"]["context"]).resolve()
    assert context == REPO
    assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    data_dir = str(_node_config().node.data_dir)
    assert _mounts(service).get(data_dir) in _compose()["volumes"], data_dir
    assert ORTHANC_SERVICE in service["depends_on"]


def test_node_yaml_loads_and_its_rules_name_known_models_and_destinations() -> None:
    config = _node_config()
    assert config.rules.is_file(), config.rules
    assert config.rules == DEFAULT_RULES
    rules = load_rules(config.rules)
    check_rules_against_config(rules, config, config.rules)  # raises ConfigError if not
    assert "pacs" in rules.destinations


# --- the image ------------------------------------------------------------------------


def test_dockerfile_base_is_a_build_arg_defaulting_to_python_311_slim() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    assert ("FROM", "${BASE_IMAGE}") in instructions
    text = DOCKERFILE.read_text()
    assert not re.search(r"https?://", text), "the Dockerfile names no download host"


def test_dockerfile_installs_with_the_readme_command_and_runs_the_readme_serve() -> None:
    install, serve = _readme_first_command()
    assert install == "./install.sh"
    runs = [_shell_commands(run) for run in _instructions("RUN")]
    assert any(install in commands for commands in runs), runs
    assert serve == ".venv/bin/dicom-ai serve"
    argv = _cmd()
    assert argv[:2] == serve.split()
    assert argv[2:] == ["--config", "/app/docker/node.yaml"]
    assert "--config" in CliRunner().invoke(app, ["serve", "--help"]).output


def test_everything_the_container_reads_is_copied_and_no_host_venv_is() -> None:
    config_in_image = _cmd()[3]
    assert _image_to_repo(config_in_image) == NODE_YAML
    # node.yaml names no rules: the node routes with its package's, copied with the package
    # (install.sh installs it editable, so it reads them where the COPY put them).
    assert "rules" not in yaml.safe_load(NODE_YAML.read_text())
    assert _image_to_repo(f"dicom_ai/{DEFAULT_RULES.name}") == DEFAULT_RULES
    for needed in ("install.sh", "pyproject.toml", "constraints.txt", "dicom_ai/cli.py"):
        assert _image_to_repo(needed) == REPO / needed, needed
    sources = [s for copy in _instructions("COPY") for s in shlex.split(copy)[:-1]]
    assert not {".", "./"} & set(sources), "COPY . would bring a host .venv along"
    assert not any(s.startswith(".venv") for s in sources)


# --- the integration test's Orthanc is this Orthanc ---------------------------------------


def test_integration_settings_change_only_ports_hosts_storage_and_timing() -> None:
    docker = docker_orthanc_config()
    settings = orthanc_settings(node_port=40000, stable_age=2)
    changed = {k for k in docker.keys() | settings.keys() if docker.get(k) != settings.get(k)}
    assert changed == {
        "DicomAet",  # passed to tests.peers.Orthanc as ae_title instead
        "DicomPort",
        "HttpPort",
        "StorageDirectory",
        "IndexDirectory",
        "DicomModalities",
        "Plugins",
        "LuaScripts",
        "RemoteAccessAllowed",
        "StableAge",
    }
    ae_title, _, _ = node_modality(docker)
    assert settings["DicomModalities"][node_modality_name()] == [ae_title, "127.0.0.1", 40000]
    assert settings["LuaScripts"] == [str(FORWARD_LUA)]


@pytest.mark.orthanc
def test_compose_orthanc_image_is_the_version_the_integration_tests_run() -> None:
    uses("orthanc", "Orthanc --version")
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc (./install.sh) is not installed")
    version = subprocess.run(
        ["Orthanc", "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split()[1]
    assert _service(ORTHANC_SERVICE)["image"].rsplit(":", 1)[1] == version

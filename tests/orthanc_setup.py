"""The Orthanc of ``docker/`` as a loopback test peer.

    orthanc = docker_orthanc(workdir, node_port).start()

The settings are docker/orthanc/orthanc.json and docker/orthanc/forward.lua as they ship;
only what a test on one machine must change is overridden: ports (ephemeral, chosen by
`tests.peers.Orthanc`), the node's host and port, storage (a fresh folder), the plugin path
(Debian's DICOMweb plugin), remote access (loopback only) and, to keep the test short,
``StableAge``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.peers import ORTHANC_PLUGINS, REPO, Orthanc

__all__ = [
    "DOCKER",
    "FORWARD_LUA",
    "ORTHANC_JSON",
    "docker_orthanc",
    "docker_orthanc_config",
    "node_modality",
    "node_modality_name",
    "orthanc_settings",
]

DOCKER = REPO / "docker"
ORTHANC_JSON = DOCKER / "orthanc" / "orthanc.json"
FORWARD_LUA = DOCKER / "orthanc" / "forward.lua"

# Set by tests.peers.Orthanc (ephemeral ports, fresh storage) or passed as its ae_title.
_SET_BY_PEER = ("DicomAet", "DicomPort", "HttpPort", "StorageDirectory", "IndexDirectory")
_NODE_MODALITY = re.compile(r"""^NODE_MODALITY\s*=\s*(['"])([^'"]+)\1""", re.MULTILINE)


def docker_orthanc_config() -> dict[str, Any]:
    """docker/orthanc/orthanc.json as Orthanc reads it (plain JSON: no comments)."""
    config: dict[str, Any] = json.loads(ORTHANC_JSON.read_text())
    return config


def node_modality_name(lua: Path = FORWARD_LUA) -> str:
    """The DicomModalities name forward.lua sends to (its ``NODE_MODALITY = '...'``)."""
    found = _NODE_MODALITY.findall(lua.read_text())
    if len(found) != 1:
        raise ValueError(f"{lua}: expected one NODE_MODALITY assignment, found {len(found)}")
    return str(found[0][1])


def node_modality(config: dict[str, Any]) -> tuple[str, str, int]:
    """(AE title, host, port) of the node's DicomModalities entry, array or object form."""
    entry = config["DicomModalities"][node_modality_name()]
    if isinstance(entry, dict):
        return str(entry["AET"]), str(entry["Host"]), int(entry["Port"])
    ae_title, host, port = entry[:3]
    return str(ae_title), str(host), int(port)


def orthanc_settings(node_port: int, stable_age: int = 2) -> dict[str, Any]:
    """Settings for `tests.peers.Orthanc`: the docker config with loopback overrides."""
    settings = docker_orthanc_config()
    for key in _SET_BY_PEER:
        settings.pop(key, None)
    name = node_modality_name()
    ae_title, _, _ = node_modality(docker_orthanc_config())
    settings["DicomModalities"] = {
        **settings["DicomModalities"],
        name: [ae_title, "127.0.0.1", node_port],
    }
    settings["Plugins"] = [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")]
    settings["LuaScripts"] = [str(FORWARD_LUA)]
    settings["RemoteAccessAllowed"] = False
    # Docker uses a few seconds (see docker/README.md); shorter here keeps the test short.
    settings["StableAge"] = stable_age
    return settings


def docker_orthanc(workdir: Path, node_port: int, stable_age: int = 2) -> Orthanc:
    """An (unstarted) Orthanc with the docker config, forwarding to the node at node_port."""
    return Orthanc(
        workdir,
        ae_title=str(docker_orthanc_config()["DicomAet"]),
        dicomweb=True,
        settings=orthanc_settings(node_port, stable_age),
    )

"""The console as `dicom-ai serve` runs it: its own process, users from the CLI, HTTPS,
turned off, and a port that is taken."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import REPO, NodeProcess, free_port, node_config, port_open
from tests.tls_certs import make_pki

pytestmark = pytest.mark.slow


def _cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        return json.loads(answer.read())


def test_users_from_the_cli_and_the_api_over_http(tmp_path: Path) -> None:
    web_port = free_port()
    config = node_config(
        tmp_path, free_port(), web={"enabled": True, "host": "127.0.0.1", "port": web_port}
    )
    node = NodeProcess(tmp_path, config).start()
    try:
        assert f"console on http://127.0.0.1:{web_port}/" in node.log_text()
        assert _get(f"http://127.0.0.1:{web_port}/healthz")["status"] == "ok"
        added = _cli(
            node.config_path,
            "users",
            "add",
            "ops",
            "--role",
            "operator",
            stdin="a-long-password\na-long-password\n",
        )
        assert added.returncode == 0, added.stderr
        differ = _cli(node.config_path, "users", "add", "x", stdin="one-password\ntwo-password\n")
        assert differ.returncode == 1 and "differ" in differ.stdout + differ.stderr
        assert "Traceback" not in differ.stdout + differ.stderr
        token = _cli(node.config_path, "users", "token", "ops").stdout.strip()
        assert token.startswith("dai_")
        page = _get(f"http://127.0.0.1:{web_port}/api/v1/series", token)
        assert page["total"] == 0
        # A replay runs in a process of the console's own (a child of a child of the node).
        replay = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/api/v1/rules/replay",
            data=json.dumps({"text": "rules: []\n", "count": 5}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(replay, timeout=60) as answer:
            assert json.loads(answer.read())["series"] == 0
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"http://127.0.0.1:{web_port}/api/v1/series")
        assert refused.value.code == 401
        unknown = _cli(node.config_path, "users", "token", "nobody")
        assert unknown.returncode == 1 and "no user" in unknown.stdout + unknown.stderr
        exported = _cli(node.config_path, "audit", "export")
        actions = [json.loads(line)["action"] for line in exported.stdout.splitlines()]
        assert actions == ["user.add", "user.token", "rules.replay"]
    finally:
        node.stop()
    assert not port_open(web_port)  # the console's process stopped with the node


def test_the_console_serves_https_with_web_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    web_port = free_port()
    web = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": web_port,
        "tls": {"certificate": str(pki.server_certificate), "private_key": str(pki.server_key)},
    }
    node = NodeProcess(tmp_path, node_config(tmp_path, free_port(), web=web)).start()
    try:
        assert f"console on https://127.0.0.1:{web_port}/" in node.log_text()
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.check_hostname = False  # the test certificate names localhost
        answer = _get(f"https://127.0.0.1:{web_port}/healthz", context=context)
        assert answer["status"] == "ok"
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP, TLS port
            _get(f"http://127.0.0.1:{web_port}/healthz")
    finally:
        node.stop()


def test_web_enabled_false_opens_no_port(tmp_path: Path) -> None:
    web_port = free_port()
    config = node_config(
        tmp_path, free_port(), web={"enabled": False, "host": "127.0.0.1", "port": web_port}
    )
    node = NodeProcess(tmp_path, config).start()
    try:
        assert not port_open(web_port)
        assert "console on" not in node.log_text()
    finally:
        node.stop()


def test_a_taken_console_port_is_one_clear_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        config = node_config(
            tmp_path, free_port(), web={"enabled": True, "host": "127.0.0.1", "port": port}
        )
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "dicom_ai.cli", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        taken.close()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"console: cannot listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output

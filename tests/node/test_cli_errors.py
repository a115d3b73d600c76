"""`dicom-ai serve` that cannot start says why in one line and exits 2, without a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import free_port


def _serve(config: Path, cwd: Path) -> tuple[int, str]:
    """Exit status and stderr of `dicom-ai serve --config config`; stdout must stay empty."""
    done = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.stdout == "", done.stdout
    return done.returncode, done.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def _write_config(path: Path, node: dict[str, Any]) -> Path:
    # No console: these are about the DICOM side (tests/web covers a taken console port).
    config = {"node": {"host": "127.0.0.1", **node}, "web": {"enabled": False}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    config = _write_config(tmp_path / "node.yaml", {"port": port, "data_dir": "data"})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    assert _one_line(stderr) == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_config_that_is_not_yaml(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node:\n  port: [11112\n")
    rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: {config}:3: invalid YAML: "), line


def test_config_with_an_invalid_value_names_file_line_and_field(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node:\n  ae_title: DICOM_AI\n  port: 70000\n")
    rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    assert _one_line(stderr) == (
        f"error: {config}:3: node.port: Input should be less than or equal to 65535"
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: None, "No such file or directory"),
        (lambda path: path.mkdir(), "Is a directory"),
        # Root reads a file whatever its mode; invalid UTF-8 is unreadable for everyone.
        (lambda path: path.write_bytes(b"node:\n  ae_title: \xff\xfe\n"), "not UTF-8 text"),
    ],
    ids=["missing", "directory", "not-text"],
)
def test_config_that_cannot_be_read(tmp_path: Path, make: Any, reason: str) -> None:
    config = tmp_path / "node.yaml"
    make(config)
    rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: {config}: ") and reason in line, line


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    # Under a regular file: no directory can be made there, not even by root.
    (tmp_path / "a-file").write_text("")
    data_dir = (tmp_path / "a-file" / "data").resolve()
    config = _write_config(tmp_path / "node.yaml", {"port": free_port(), "data_dir": str(data_dir)})
    rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: data_dir {data_dir} is not usable: {data_dir}/"), line
    assert line.endswith(": Not a directory"), line


@contextmanager
def _unwritable_directory(path: Path) -> Iterator[str]:
    """``path`` as a directory the node cannot write in; yields the error it will meet.
    Root writes whatever the mode: for root it is a read-only tmpfs."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            path.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    assert mounted.returncode == 0, f"cannot mount a read-only tmpfs: {mounted.stderr}"
    try:
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_data_dir_without_write_permission(tmp_path: Path) -> None:
    data_dir = (tmp_path / "data").resolve()
    config = _write_config(tmp_path / "node.yaml", {"port": free_port(), "data_dir": str(data_dir)})
    with _unwritable_directory(data_dir) as error:
        rc, stderr = _serve(config, tmp_path)
    assert rc == 2
    line = _one_line(stderr)
    assert line.startswith(f"error: data_dir {data_dir} is not usable: "), line
    assert line.endswith(f": {error}"), line


def test_models_with_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node:\n  port: 70000\n")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "models", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {config}:2: node.port: Input should be less than or equal to 65535"
    ], done.stderr

"""The spool: received instances and produced results as durable files.

Every write goes temp file -> fsync -> rename -> fsync of the folder, so a file that exists
under its final name is complete and survives a crash or power loss. The temp folder is on
the same filesystem, so the rename is atomic.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from dicom_ai.errors import InputError, OutOfSpaceError, StorageError

__all__ = ["Spool"]

# UIDs are digits and dots; anything else would let a peer pick a path.
_UID = re.compile(r"^[0-9.]{1,64}$")


def _checked_uid(uid: str) -> str:
    if not _UID.fullmatch(uid) or ".." in uid:
        raise InputError(f"not a valid UID for a file name: {uid!r}")
    return uid


class Spool:
    """Instance files under ``root/instances/<study>/<series>/<sop>.dcm`` and result files
    under ``root/results/<job>/``."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._tmp = root / "tmp"
        self._known_dirs: set[Path] = set()
        for folder in (self._tmp, root / "instances", root / "results"):
            folder.mkdir(parents=True, exist_ok=True)

    def remove_stale_temp_files(self) -> int:
        """On start, before receiving: temp files left by a crash are never referenced."""
        stale = list(self._tmp.iterdir())
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return (
            self.root
            / "instances"
            / _checked_uid(study_uid)
            / _checked_uid(series_uid)
            / f"{_checked_uid(sop_instance_uid)}.dcm"
        )

    def instance_files(self) -> list[Path]:
        return sorted((self.root / "instances").glob("*/*/*.dcm"))

    def results_dir(self, job_id: int) -> Path:
        return self.root / "results" / str(job_id)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        """Refuse before writing anything when the write would cross the watermark."""
        if self.free_bytes() - incoming < self.min_free_bytes:
            raise OutOfSpaceError(f"free space below {self.min_free_bytes} bytes on {self.root}")

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` so that ``path`` is either absent or complete and durable."""
        self.check_space(len(data))
        folder = path.parent
        if folder not in self._known_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(folder)
        tmp = self._tmp / f"{path.name}.{os.getpid()}.{id(data)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:  # ENOSPC
                raise OutOfSpaceError(f"no space left writing {path.name}") from exc
            raise StorageError(f"cannot write {path}: {exc}") from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

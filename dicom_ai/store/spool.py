"""The spool: received instances and produced results as durable files.

Every write goes temp file -> fsync -> rename -> fsync of the folder, so a file that exists
under its final name is complete and survives a crash or power loss. The temp folder is on
the same filesystem, so the rename is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_ai.errors import InputError, OutOfSpaceError, StorageError

__all__ = ["Spool"]

Buffer = bytes | bytearray | memoryview

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
        self._direct = True  # until the filesystem refuses O_DIRECT
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

    def result_job_ids(self) -> list[int]:
        """The jobs that have a results folder."""
        return sorted(int(p.name) for p in (self.root / "results").iterdir() if p.name.isdigit())

    def remove_instance_files(self, paths: Sequence[Path]) -> None:
        """Delete instance files, then their series and study folders where empty. A
        receiver writing into a folder removed here makes it again (`write_atomic`)."""
        folders = set()
        for path in paths:
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:
            self._known_dirs.discard(folder)
            for empty in (folder, folder.parent):
                try:
                    empty.rmdir()
                except OSError:  # not empty (more of the series or study), or gone
                    break

    def remove_results(self, job_id: int) -> None:
        shutil.rmtree(self.results_dir(job_id), ignore_errors=True)

    def remove_empty_folders(self) -> int:
        """Series and study folders a crash left empty; how many went."""
        removed = 0
        for study in (self.root / "instances").iterdir():
            for series in list(study.iterdir()) if study.is_dir() else []:
                with contextlib.suppress(OSError):
                    series.rmdir()
                    removed += 1
            with contextlib.suppress(OSError):
                study.rmdir()
                removed += 1
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        """Refuse before writing anything when the write would cross the watermark."""
        if self.free_bytes() - incoming < self.min_free_bytes:
            raise OutOfSpaceError(f"free space below {self.min_free_bytes} bytes on {self.root}")

    def write_atomic(self, path: Path, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``data`` (bytes, or pieces written one after the other) to ``path`` so that
        ``path`` is either absent or complete and durable."""
        pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        size = sum(len(piece) for piece in pieces)
        self.check_space(size)
        folder = path.parent
        if folder not in self._known_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(folder)
        # One write at a time per thread: process and thread make the temp name unique.
        tmp = self._tmp / f"{path.name}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            if not (self._direct and size <= _DIRECT_MAX and self._write_direct(tmp, pieces, size)):
                _write_buffered(tmp, pieces)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                # The cleaner removed the (empty) folder of a purged series meanwhile.
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise OutOfSpaceError(f"no space left writing {path.name}") from exc
            raise StorageError(f"cannot write {path}: {exc}") from exc

    def _write_direct(self, tmp: Path, pieces: Sequence[Buffer], size: int) -> bool:
        """O_DIRECT: the bytes go from one aligned buffer to the disk, not through the page
        cache, which costs less kernel CPU per received instance. False where the filesystem
        does not do O_DIRECT (tmpfs); the caller then writes buffered."""
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False
            return False
        try:
            padded = -(-size // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
            buffer = _aligned_buffer(padded)
            offset = 0
            for piece in pieces:  # the one copy the bytes take on their way to disk
                buffer[offset : offset + len(piece)] = piece
                offset += len(piece)
            buffer[size:padded] = bytes(padded - size)
            try:
                _write_all(fd, memoryview(buffer)[:padded])
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # alignment refused: write this one buffered
                    raise
                self._direct = False
                return False
            os.ftruncate(fd, size)  # the padding goes; the file is exactly the data
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


# Direct I/O wants buffer, length and offset aligned to the device's block size; 4 KiB
# covers 512-byte and 4K-sector disks. Larger instances than _DIRECT_MAX go buffered, so
# a huge multi-frame object is not held twice in memory.
_DIRECT_ALIGNMENT = 4096
_DIRECT_MAX = 64 << 20
_buffers = threading.local()


def _aligned_buffer(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer of at least ``size`` bytes (kept for reuse)."""
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        if buffer is not None:
            buffer.close()
        buffer = mmap.mmap(-1, size)
        _buffers.buffer = buffer
    return buffer


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_buffered(tmp: Path, pieces: Sequence[Buffer]) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for piece in pieces:
            _write_all(fd, memoryview(piece))
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Run a function in a process of its own, killed when it takes too long.

A rules file is data, but its regular expressions can backtrack for hours on a UID's
digits, and Python's ``re`` holds the interpreter lock while it does: a candidate file a
viewer replays must not freeze the console. Its evaluation runs here instead.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from dicom_ai.lifecycle import die_with_parent

__all__ = ["IsolatedError", "run_isolated"]

T = TypeVar("T")


class IsolatedError(RuntimeError):
    """The function raised in its process (the message names the exception), or took
    longer than its time (``timed_out``)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def _call(conn: Connection, parent_pid: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    die_with_parent(parent_pid)
    try:
        conn.send((True, fn(*args)))
    except Exception as exc:  # sent back as text: an exception may not pickle
        conn.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., T], *args: Any, timeout: float) -> T:
    """``fn(*args)`` in a spawned process; its answer must pickle. Raises `IsolatedError`."""
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(
        target=_call, args=(sending, os.getpid(), fn, args), name="dicom-ai-isolated", daemon=True
    )
    process.start()
    sending.close()
    try:
        if not receiving.poll(timeout):
            raise IsolatedError(f"took longer than {timeout:.0f} s", timed_out=True)
        try:
            ok, value = receiving.recv()
        except EOFError:
            raise IsolatedError(f"its process ended ({process.exitcode})") from None
    finally:
        receiving.close()
        if process.is_alive():
            process.kill()
        process.join(5)
    if not ok:
        raise IsolatedError(str(value))
    result: T = value
    return result

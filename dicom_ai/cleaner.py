"""The cleaner: the retention policy (store/retention.py) applied in a process of its own.

Its own process, niced, with its own index connection: a purge of thousands of series
takes neither the node's interpreter lock nor a core from receiving, and meets receivers
only at the index's write lock, which it takes for milliseconds at a time
(`Purger.pause`). It dies with the node (``lifecycle.die_with_parent``); on SIGTERM it
stops after the series it is purging, and what a stop or a kill leaves is finished by the
next sweep.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from dicom_ai.config import Config
from dicom_ai.lifecycle import die_with_parent, stop_child
from dicom_ai.receivers import open_store
from dicom_ai.store.retention import Purger, RetentionPolicy

__all__ = ["Cleaner"]

log = logging.getLogger(__name__)

_NICENESS = 10


class Cleaner:
    def __init__(self, config: Config, log_level: int) -> None:
        self._config = config
        self._log_level = log_level
        self._process: BaseProcess | None = None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_cleaner_main,
            args=(self._config, os.getpid(), self._log_level),
            name="dicom-ai-cleaner",
            daemon=True,
        )
        self._process.start()

    def stop(self) -> None:
        stop_child(self._process, timeout=30)  # it stops after the series it is purging
        self._process = None


def _cleaner_main(config: Config, parent_pid: int, log_level: int) -> None:
    die_with_parent(parent_pid)
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us
    spool, index = open_store(config)
    try:
        Purger(index, spool, RetentionPolicy.from_config(config.storage)).run(
            stop, config.storage.cleanup_interval_seconds
        )
    finally:
        index.close()

"""Rules that follow their files: each called AE title's rules, reloaded when edited.

A file that no longer loads (or no longer passes ``check``) leaves the running rules in
place and is logged; the node keeps routing as before until the file is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dicom_ai.errors import ConfigError
from dicom_ai.routing.engine import RuleSet, load_rules

__all__ = ["LiveRules"]

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    path: Path
    mtime: float
    rules: RuleSet


def _no_check(rules: RuleSet, path: Path) -> None:
    pass


class LiveRules:
    """The rules of each called AE title, from ``files`` (title -> rules file).

    ``check(rules, path)`` raises `ConfigError` for rules the node cannot run (say, a model
    it does not know). Loading at construction raises; a later reload only logs.
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        check: Callable[[RuleSet, Path], None] = _no_check,
    ) -> None:
        self._check = check
        self._loaded: dict[str, _Loaded] = {}
        for title, path in files.items():
            mtime = path.stat().st_mtime
            rules = load_rules(path)
            check(rules, path)
            self._loaded[title] = _Loaded(path, mtime, rules)

    def by_called_ae(self) -> dict[str, RuleSet]:
        """The rules in force now, by called AE title."""
        return {title: loaded.rules for title, loaded in self._loaded.items()}

    def reload_if_changed(self) -> list[str]:
        """Reload every rules file changed since it was last read; the titles reloaded."""
        reloaded = []
        for title, loaded in self._loaded.items():
            try:
                mtime = loaded.path.stat().st_mtime
            except OSError:
                continue
            if mtime == loaded.mtime:
                continue
            loaded.mtime = mtime
            try:
                rules = load_rules(loaded.path)
                self._check(rules, loaded.path)
            except ConfigError as exc:
                log.error("rules of %s not reloaded, the running rules stay: %s", title, exc)
                continue
            loaded.rules = rules
            reloaded.append(title)
            log.info("rules of %s reloaded from %s", title, loaded.path)
        return reloaded

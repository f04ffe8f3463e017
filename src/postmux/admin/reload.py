"""Configuration reload: read the file again, say which keys need a restart, hand the rest to the node.

What a reload changes is decided by each component's own `reconfigure` (App.configure calls them, the same
path the start takes); this module only reads the file and keeps the restart-only sections as they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from postmux.config import ConfigError, Settings, load_config

log = structlog.get_logger("postmux.control")

# Sections a running process cannot change: every key in them needs a restart. The SMTP listener (in this
# process or in ingress workers) is built once from [smtp]; the HTTP listener and its admin token, the
# spool and the event log are opened once at start; [shutdown] is handed to the ingress workers at start;
# the throttles' store (memory or Redis) is chosen and connected once.
RESTART_ONLY = ("smtp", "http", "spool", "events", "shutdown", "throttles")
# Lists of tables a running process keeps as they were at start: the webhook senders are started once.
RESTART_ONLY_LISTS = ("webhook",)
# Single keys of otherwise live sections: the node's name is in its leases, heartbeats and events from the
# start; the [verp] domain is the one the SMTP listener (and its workers) take mail for from anyone, set at
# start, so a return path at a new domain would be written while its DSNs were refused as relaying.
RESTART_ONLY_KEYS = (("node", "name"), ("verp", "domain"))

# Applies settings to the running node and returns what changed, in words for the operator.
Configure = Callable[[Settings], list[str]]


@dataclass
class ReloadResult:
    ok: bool
    changes: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changes": self.changes,
            "needs_restart": self.needs_restart,
            "problems": [{"key": k, "reason": r} for k, r in self.problems],
        }


class Reloader:
    """Reloads from `config_path` into `configure`; `started` is what the restart-only sections run as."""

    def __init__(self, config_path: str | Path | None, started: Settings, configure: Configure) -> None:
        self.config_path = Path(config_path) if config_path else None
        # What is running of the restart-only sections: the settings at start, whatever reloads said since.
        self.started = started
        self.configure = configure

    def reload(self) -> ReloadResult:
        """Read the configuration file again; a file with any error changes nothing."""
        if self.config_path is None:
            return ReloadResult(False, problems=[("(file)", "this process was not started from a file")])
        try:
            settings = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused", problems=e.problems)
            return ReloadResult(False, problems=e.problems)
        result = ReloadResult(True, needs_restart=self._restart_only(settings))
        result.changes = self.configure(self.running(settings))
        log.info("configuration reloaded", changes=result.changes, needs_restart=result.needs_restart)
        return result

    def running(self, settings: Settings) -> Settings:
        """What runs on: the file's live sections, and the restart-only ones as they were at start."""
        kept: dict[str, Any] = {s: getattr(self.started, s) for s in (*RESTART_ONLY, *RESTART_ONLY_LISTS)}
        for section, key in RESTART_ONLY_KEYS:
            table = kept.get(section, getattr(settings, section))
            kept[section] = table.model_copy(update={key: getattr(getattr(self.started, section), key)})
        return settings.model_copy(update=kept)

    def _restart_only(self, new: Settings) -> list[str]:
        """Restart-only keys whose value in the file differs from what is running.

        Compared with the settings the process started with, never with the last file loaded: a key
        edited, reloaded and edited again still needs a restart until the running value and the file agree.
        """
        return (
            [
                f"{section}.{key}"
                for section in RESTART_ONLY
                for key, value in getattr(new, section)
                if value != getattr(getattr(self.started, section), key)
            ]
            + [
                section
                for section in RESTART_ONLY_LISTS
                if getattr(new, section) != getattr(self.started, section)
            ]
            + [
                f"{section}.{key}"
                for section, key in RESTART_ONLY_KEYS
                if getattr(getattr(new, section), key) != getattr(getattr(self.started, section), key)
            ]
        )

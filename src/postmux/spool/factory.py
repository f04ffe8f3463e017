"""Build the spool the configuration asks for."""

from __future__ import annotations

from postmux.config import SpoolSettings
from postmux.spool.base import Spool
from postmux.spool.sqlite import SqliteSpool


def make_spool(settings: SpoolSettings) -> Spool:
    return SqliteSpool(settings.path, group_commit=settings.group_commit, max_batch=settings.max_batch)

"""Build the spool the configuration asks for: `[spool] url` (or `path`) picks the backend."""

from __future__ import annotations

from postmux.config import SpoolSettings, sqlite_path_of
from postmux.spool.base import SpoolBackend, SpoolError
from postmux.spool.sqlite import SqliteSpool


def make_spool(settings: SpoolSettings) -> SpoolBackend:
    if settings.url and sqlite_path_of(settings.url) is None:
        # The configuration refuses such a URL at load; this is for settings built some other way.
        raise SpoolError("only SQLite spools are supported so far ([spool] url = 'sqlite:///PATH')")
    # A sqlite:/// URL has set `path` to its file when the configuration was loaded.
    return SqliteSpool(
        settings.path,
        group_commit=settings.group_commit,
        max_batch=settings.max_batch,
        inline_max=settings.inline_bytes,
    )

"""Build the spool the configuration asks for: `[spool] backend` (and `url` or `path`) picks it."""

from __future__ import annotations

from pathlib import Path

from postmux.config import SpoolSettings, sqlite_path_of
from postmux.spool.base import SpoolBackend, SpoolError
from postmux.spool.postgres import PostgresSpool
from postmux.spool.sqlite import SqliteSpool


def make_spool(settings: SpoolSettings, node: str = "") -> SpoolBackend:
    """`node`: [node] name as set (not the host's name it defaults to), the lease owner unless [spool]
    node_id says another; neither set: host:PID (PostgresSpool's default)."""
    if settings.backend == "postgresql":
        # The node's spill directory (texts arriving past [smtp] spill_bytes) sits beside its other files;
        # the store reads such a text into its row, so it never has to be on a shared disk.
        return PostgresSpool(
            settings.dsn,
            owner=settings.node_id or node or None,
            lease_ttl_s=settings.lease_ttl,
            timeout_s=settings.timeout,
            max_batch=settings.max_batch if settings.group_commit else 1,
            spill_dir=Path(settings.path).with_name("spill"),
        )
    if settings.url and sqlite_path_of(settings.url) is None:
        # The configuration refuses such a URL at load; this is for settings built some other way.
        raise SpoolError("not a SQLite spool URL ([spool] url = 'sqlite:///PATH')")
    # A sqlite:/// URL has set `path` to its file when the configuration was loaded.
    return SqliteSpool(
        settings.path,
        group_commit=settings.group_commit,
        max_batch=settings.max_batch,
        inline_max=settings.inline_bytes,
        commit_delay_s=settings.commit_delay,
        commit_siblings=settings.commit_siblings,
    )

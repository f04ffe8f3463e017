"""The durable store of accepted messages and their per-recipient state."""

from postmux.spool.base import (
    QueueOperations,
    RecipientState,
    Selector,
    Settlement,
    Spool,
    SpoolBackend,
    SpoolError,
)

__all__ = [
    "QueueOperations",
    "RecipientState",
    "Selector",
    "Settlement",
    "Spool",
    "SpoolBackend",
    "SpoolError",
]

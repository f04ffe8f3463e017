"""The durable store of accepted messages and their per-recipient state."""

from postmux.spool.base import RecipientState, Settlement, Spool, SpoolError, WorkItem, WorkRecipient

__all__ = ["RecipientState", "Settlement", "Spool", "SpoolError", "WorkItem", "WorkRecipient"]

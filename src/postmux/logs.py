"""structlog set-up: one JSON object per line (stderr by default) for operators' log shippers.

Libraries log through the standard `logging` module (aiosmtpd's `mail.log`, asyncio, uvicorn): their records
go through the same JSON renderer, with the logger's name, so a log shipper never meets a plain-text line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO


def configure_logging(level: int = logging.INFO, file: TextIO | None = None) -> None:
    import structlog

    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=True,
    )
    foreign: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        stamp,
        structlog.processors.format_exc_info,
    ]
    handler = logging.StreamHandler(file or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=foreign,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries speak at WARNING and above; their INFO chatter (every aiosmtpd command) is not for operators.
    root.setLevel(logging.WARNING)

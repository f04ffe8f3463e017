"""structlog set-up: one JSON object per line (stderr by default) for operators' log shippers."""

from __future__ import annotations

import logging
import sys
from typing import TextIO


def configure_logging(level: int = logging.INFO, file: TextIO | None = None) -> None:
    import structlog

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=True,
    )

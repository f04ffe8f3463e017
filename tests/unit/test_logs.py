"""Every line postmux writes to its log is one JSON object, whoever logged it."""

from __future__ import annotations

import io
import json
import logging

import structlog

from postmux.logs import configure_logging


def test_a_library_logging_through_the_standard_module_is_written_as_json_with_its_name() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging(file=out)
        # aiosmtpd's own logger: before, its lines came out as plain text among the JSON ones.
        logging.getLogger("mail.log").warning("%r unrecognised command: %s", ("127.0.0.1", 1), "FOO")
        logging.getLogger("mail.log").info("chatter an operator does not want")
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logging.getLogger("asyncio").exception("task failed")
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [("mail.log", "warning"), ("asyncio", "error")]
    assert lines[0]["event"] == "('127.0.0.1', 1) unrecognised command: FOO"
    assert "ZeroDivisionError: boom" in lines[1]["exception"]

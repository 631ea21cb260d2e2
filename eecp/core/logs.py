"""Logging: one line per event, as text (default) or JSON (``EE_LOG_FORMAT=json``).

Never pass a token or a whole quote to a log call; :func:`redact` shortens long opaque values
(hex, base64) that must be mentioned.

A structured line (the access log, :mod:`eecp.dataplane.access`) names its arguments with
``extra={FIELDS_ATTR: names}``: its text is the message as usual, and its JSON has one key per
argument instead of the formatted message (``-``, the text's "no value", is ``null`` there).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import TextIO

from eecp.core.clock import isoformat

#: the record attribute naming a structured line's arguments, in order
FIELDS_ATTR = "ee_fields"


class JsonFormatter(logging.Formatter):
    """A JSON object per line: ts, level, logger, msg (and exc when there is one); a
    structured line's fields instead of its formatted message."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if fields is not None and isinstance(record.args, tuple):
            doc.update((name, None if value == "-" else value)
                       for name, value in zip(fields, record.args, strict=True))
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _stamp(record: logging.LogRecord) -> str:
    # whole seconds (all the stamp shows): a log line's exact float time would take a new
    # entry of isoformat's cache each time, pushing out the timestamps resolve answers reuse
    return isoformat(float(math.floor(record.created)))


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message>``, with tracebacks folded onto the same line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = _stamp(record)
        line = f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " | " + " | ".join(self.formatException(record.exc_info).splitlines())
        return line


def setup_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger (eecp, hypercorn, ...) to one handler in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO; URLs may carry query strings we do not want echoed.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def redact(value: str | bytes, keep: int = 8) -> str:
    """A long opaque value cut to its first ``keep`` characters plus its length."""
    text = value.hex() if isinstance(value, bytes) else value
    if len(text) <= keep:
        return text
    return f"{text[:keep]}…({len(text)} chars)"

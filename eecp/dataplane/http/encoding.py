"""What the server writes, as bytes: status lines, header blocks, the Date line, error bodies.

Pure, and cheap on the hot path: status lines are made once, a handler's constant headers
(given as a tuple) are encoded once, and the Date line once a second.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus

from eecp.core.errors import EecpError

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CLOSE = b"connection: close\r\n"
KEEP_ALIVE = b"connection: keep-alive\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"
LAST_CHUNK = b"0\r\n\r\n"
#: the headers of the server's own error answers
JSON_CLOSE = (("content-type", "application/json"), ("connection", "close"))
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
# Headers that frame the message or the connection: the server writes its own.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
# Response headers the encoder looks at (one set lookup per header): framing ones, and Date,
# which the server writes unless the handler gave one.
_NOTED = _FRAMING | {"date"}

#: the encoded headers, their Content-Length, whether they ask to close, whether they carry a Date
HeaderBlock = tuple[bytes, int | None, bool, bool]
_DECIMAL = re.compile(r"[0-9]{1,19}")
_HEADER_BLOCKS: dict[tuple[tuple[str, str], ...], HeaderBlock] = {}
_HEADER_BLOCKS_MAX = 256


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <phrase>``, CRLF (no phrase for a status HTTP does not name)."""
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def header_block(headers: Sequence[tuple[str, str]]) -> HeaderBlock:
    """:func:`encode_headers`, remembered for headers given as a tuple (immutable: the same
    tuple always encodes the same way), as hot handlers do with their constant headers."""
    if not isinstance(headers, tuple):
        return encode_headers(headers)
    block = _HEADER_BLOCKS.get(headers)
    if block is None:
        if len(_HEADER_BLOCKS) >= _HEADER_BLOCKS_MAX:
            _HEADER_BLOCKS.clear()  # handlers building fresh tuples per request: no cache
        block = _HEADER_BLOCKS[headers] = encode_headers(headers)
    return block


def encode_headers(headers: Sequence[tuple[str, str]]) -> HeaderBlock:
    """The handler's headers as bytes (framing ones left out), its Content-Length, whether it
    asked to close, and whether it gave a Date. Refuses CR/LF inside names or values (response
    splitting).

    A handler's Date replaces the server's (a proxy passes the origin's on, RFC 9110 6.6.1):
    an answer has one Date, the first the handler gave."""
    lines: list[str] = []
    length: int | None = None
    close = dated = False
    for name, value in headers:
        key = name.lower()
        if key in _NOTED:
            if key == "date":
                if dated:
                    continue
                dated = True
            else:
                if key == "content-length":
                    if not _DECIMAL.fullmatch(value.strip()):  # int() takes "-1", "+5", "1_0"
                        raise ValueError(f"invalid Content-Length {value[:40]!r}")
                    length = int(value)
                elif key == "connection":
                    close = close or "close" in value.lower()
                continue
        lines.append(f"{name}: {value}\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("CR or LF inside a response header")
    return text.encode("latin-1"), length, close, dated


def connection_line(http_version: str, close: bool) -> bytes:
    """The Connection header a response needs: ``close``, or ``keep-alive`` for HTTP/1.0
    (where closing is the default), or none."""
    if close:
        return CLOSE
    return KEEP_ALIVE if http_version == "1.0" else b""


def error_body(error: EecpError) -> bytes:
    """The body of the server's own answer to a request it refuses: ``{"error": reason}``."""
    return json.dumps({"error": error.reason}).encode()


_date_second = -1
_date_bytes = b""


def date_line() -> bytes:
    """The Date header, formatted once a second."""
    global _date_second, _date_bytes
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_bytes = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return _date_bytes

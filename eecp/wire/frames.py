"""The tunnel's binary data protocol, sans I/O: a binary WebSocket message is one frame, or a
BATCH of frames.

::

    byte 0       bit 7 (0x80): FIN; bit 6 (0x40): BODY; bits 0..5: frame type
    bytes 1..4   stream id, unsigned 32-bit big-endian, never 0 (eecp allocates 1, 2, 3, …)
    bytes 5..    payload, by type:

    1 REQUEST_HEAD   eecp → agent  compact JSON {"method":…,"path":…,"headers":[[name,value],…]}
    2 RESPONSE_HEAD  agent → eecp  compact JSON {"status":int,"headers":[[name,value],…]}
    3 DATA           both          raw body bytes, at most MAX_DATA (64 KiB)
    4 END            both          empty: this direction's body is complete
    5 RESET          both          utf-8 reason, 1..200 bytes: the stream is aborted both ways
    6 WINDOW         both          u32 big-endian credit increment (> 0), in body bytes
    7 BATCH          both          stream id 0; frames, each a u32 big-endian length + the
                                   frame (never a BATCH), together at most MAX_BATCH bytes

BATCH carries several frames in one message, exactly as if each had been its own message, in
order. A sender writes one when frames queue up while it is still writing (several requests at
once): the per-message cost of the WebSocket layers is then paid once for all of them, and a
lone frame still goes out at once, alone. :func:`split_message` returns the frames of either.

FIN (:data:`FIN`, the ``fin`` field) says "this direction's body is complete after this
frame", exactly as an END right after it would: a head with FIN has no body, a DATA with FIN is
the last chunk. It saves a WebSocket message per direction whenever the sender knows the end
when it writes the frame (with BODY below, a small GET is 1 + 1 messages instead of 2 + 3).
It is allowed on REQUEST_HEAD, RESPONSE_HEAD and DATA only; END stays for a sender that learns
of the end later (a chunked body).

BODY (:data:`BODY`, a head frame's non-empty ``data``) lets a head carry the first body bytes:
the payload is then a u32 big-endian head length, the head's JSON, and up to MAX_DATA body bytes
(exactly what a DATA frame right after the head would carry, credit included). With FIN too, a
whole small response is one message. It is allowed on REQUEST_HEAD and RESPONSE_HEAD only.

Headers travel as a list of pairs so repeated headers (``Set-Cookie``) and their order survive.
Unknown JSON keys in a head are ignored (newer peers may add some).

Every decoding failure is a :class:`~eecp.core.errors.ProtocolError` with a stable
``invalid_frame:<what>`` reason and the WebSocket close code to end the tunnel with: 1007
(invalid payload) when a head is not UTF-8 JSON or a RESET reason is not UTF-8, 4005 (protocol
error) for everything else. ``invalid_frame:unknown_type`` (bits 0..5 name no type, whatever
the flag bits say) is the one a receiver may choose to tolerate (a newer peer's frame type);
``invalid_frame:fin_not_allowed`` is FIN on END, RESET or WINDOW, and
``invalid_frame:body_not_allowed`` BODY on anything but a head, and ``invalid_frame:batch`` a
BATCH whose lengths do not add up, that is empty or larger than MAX_BATCH, or holds a BATCH.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NoReturn

from eecp.core.errors import ProtocolError
from eecp.wire.httpmsg import RequestHead, ResponseHead
from eecp.wire.protocol import CLOSE_INVALID_PAYLOAD, CLOSE_PROTOCOL_ERROR

HEADER_BYTES = 5
MAX_DATA = 64 * 1024
#: the most bytes one BATCH message may carry (its frames with their length prefixes): no more
#: than the largest DATA frame, so a batch fits wherever a frame does
MAX_BATCH = 64 * 1024
MAX_RESET_REASON = 200
MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW_INCREMENT = 2**32 - 1
#: credit each side has for each stream, each direction, before any WINDOW frame: 64 KiB
#: (one full DATA frame). A receiver with a larger window grants the rest with the first chunk
#: its consumer takes of a body still coming (most bodies never need it).
INITIAL_WINDOW = 64 * 1024
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
#: the flag bit of the type byte: this direction's body is complete after this frame
FIN = 0x80
#: the flag bit of the type byte: a head frame carries the first body bytes after its JSON
BODY = 0x40
_TYPE_BITS = 0x3F

_PREFIX = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_BATCH_PREFIX = _PREFIX.pack(7, 0)
# RFC 9110 token: header names and methods (always fullmatch: `$` would allow a trailing \n)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# field values: visible ASCII/obs-text, space and tab; never CR, LF or NUL (no header injection)
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# a request target: visible ASCII only (no spaces, no controls)
_TARGET = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FrameType(IntEnum):
    """The first byte of a frame, without its :data:`FIN` bit."""

    REQUEST_HEAD = 1
    RESPONSE_HEAD = 2
    DATA = 3
    END = 4
    RESET = 5
    WINDOW = 6
    BATCH = 7


@dataclass(frozen=True)
class RequestHeadFrame:
    """Opens ``stream_id``: eecp → agent; ``fin``: the request has no body."""

    stream_id: int
    head: RequestHead
    fin: bool = False
    data: bytes = b""  # the first body bytes, in the same message (BODY)


@dataclass(frozen=True)
class ResponseHeadFrame:
    """The response's head on ``stream_id``: agent → eecp; ``fin``: the response has no body."""

    stream_id: int
    head: ResponseHead
    fin: bool = False
    data: bytes = b""  # the first body bytes, in the same message (BODY)


@dataclass(frozen=True)
class DataFrame:
    """A piece of one direction's body; ``fin``: the last one."""

    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class EndFrame:
    """The sender's direction of ``stream_id`` is complete."""

    stream_id: int


@dataclass(frozen=True)
class ResetFrame:
    """``stream_id`` is aborted both ways, for ``reason``."""

    stream_id: int
    reason: str


@dataclass(frozen=True)
class WindowFrame:
    """The sender may receive ``increment`` more body bytes on ``stream_id``."""

    stream_id: int
    increment: int


Frame = (RequestHeadFrame | ResponseHeadFrame | DataFrame | EndFrame | ResetFrame
         | WindowFrame)


# ---- encoding -------------------------------------------------------------------------------


def encode_frame(frame: Frame) -> bytes:
    """The wire form of ``frame``; ``ValueError`` if it breaks a limit a peer would refuse."""
    if isinstance(frame, RequestHeadFrame | ResponseHeadFrame):
        try:
            _validate(frame.head)
        except ProtocolError as exc:
            raise ValueError(f"{exc.reason}: {exc.detail}") from None
        return encode_head_frame(frame, encode_head(frame.head))
    if not 0 < frame.stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream_id} out of range")
    kind, payload = _payload(frame)
    if isinstance(frame, DataFrame) and frame.fin:
        kind |= FIN
    return _PREFIX.pack(kind, frame.stream_id) + payload


def encode_head_frame(frame: RequestHeadFrame | ResponseHeadFrame, payload: bytes) -> bytes:
    """:func:`encode_frame` for a head frame whose head's ``payload`` came from
    :func:`check_head`: the head is neither validated nor encoded a second time."""
    if not 0 < frame.stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream_id} out of range")
    kind = (FrameType.REQUEST_HEAD if isinstance(frame, RequestHeadFrame)
            else FrameType.RESPONSE_HEAD) | (FIN if frame.fin else 0)
    if not frame.data:
        return _PREFIX.pack(kind, frame.stream_id) + payload
    if len(frame.data) > MAX_DATA:
        raise ValueError(f"a head's body of {len(frame.data)} bytes > {MAX_DATA}")
    return b"".join((_PREFIX.pack(kind | BODY, frame.stream_id), _U32.pack(len(payload)),
                     payload, frame.data))


def batch_size(frame: bytes) -> int:
    """The bytes ``frame`` (encoded) takes inside a BATCH: its length prefix included."""
    return _U32.size + len(frame)


def encode_batch(encoded: list[bytes]) -> bytes:
    """One BATCH message carrying ``encoded`` frames (none a BATCH) in order; ``ValueError``
    when they are more than :data:`MAX_BATCH` bytes together (count with :func:`batch_size`)."""
    size = sum(batch_size(frame) for frame in encoded)
    if not encoded or size > MAX_BATCH:
        raise ValueError(f"a BATCH of {len(encoded)} frames, {size} bytes (1..{MAX_BATCH})")
    parts = [_BATCH_PREFIX]
    for frame in encoded:
        parts += (_U32.pack(len(frame)), frame)
    return b"".join(parts)


def check_head(head: RequestHead | ResponseHead, *,
               max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> bytes:
    """``head``'s payload if the peer will accept it, else the ``ProtocolError`` the peer would
    raise: a sender checks first, because a head the peer refuses ends the whole tunnel."""
    _validate(head)
    payload = encode_head(head)
    if len(payload) > max_head_bytes:
        _fail("head_too_large", f"{len(payload)} > {max_head_bytes} bytes")
    return payload


def encode_head(head: RequestHead | ResponseHead) -> bytes:
    """A head's JSON payload (compact, so its size is what :func:`decode_frame` measures)."""
    headers = [[name, value] for name, value in head.headers]
    doc: dict[str, Any]
    if isinstance(head, RequestHead):
        doc = {"method": head.method, "path": head.path, "headers": headers}
        if head.upgrade is not None:
            doc["upgrade"] = head.upgrade
    else:
        doc = {"status": head.status, "headers": headers}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def reset_reason(text: str) -> str:
    """``text`` made fit for a RESET frame: controls replaced, cut to 200 UTF-8 bytes."""
    cleaned = _CONTROL.sub("?", text) or "unspecified"
    return cleaned.encode()[:MAX_RESET_REASON].decode(errors="ignore") or "unspecified"


def _payload(frame: DataFrame | EndFrame | ResetFrame | WindowFrame) -> tuple[int, bytes]:
    if isinstance(frame, DataFrame):
        if len(frame.data) > MAX_DATA:
            raise ValueError(f"DATA of {len(frame.data)} bytes > {MAX_DATA}")
        return FrameType.DATA, bytes(frame.data)
    if isinstance(frame, EndFrame):
        return FrameType.END, b""
    if isinstance(frame, ResetFrame):
        reason = frame.reason.encode()
        if not 0 < len(reason) <= MAX_RESET_REASON or _CONTROL.search(frame.reason):
            raise ValueError(f"RESET reason {frame.reason!r} is not 1..200 printable bytes")
        return FrameType.RESET, reason
    if not 0 < frame.increment <= MAX_WINDOW_INCREMENT:
        raise ValueError(f"WINDOW increment {frame.increment} out of range")
    return FrameType.WINDOW, _U32.pack(frame.increment)


# ---- decoding -------------------------------------------------------------------------------


def split_message(data: bytes) -> list[bytes | memoryview]:
    """The frames of one binary message, still encoded, in order: the message itself, or the
    frames a BATCH carries (its layout checked here; each frame by :func:`decode_frame`)."""
    if not data or data[0] & _TYPE_BITS != FrameType.BATCH:
        return [data]
    return _split_batch(data)


def _split_batch(data: bytes) -> list[bytes | memoryview]:
    """A BATCH message's frames (still encoded), its own layout checked."""
    if len(data) < HEADER_BYTES:
        _fail("short", f"{len(data)} bytes, a frame has at least {HEADER_BYTES}")
    first, stream_id = _PREFIX.unpack_from(data)
    if first & FIN:
        _fail("fin_not_allowed", "FIN on a BATCH frame")
    if first & BODY:
        _fail("body_not_allowed", "BODY on a BATCH frame")
    if stream_id != 0:
        _fail("stream_id", f"a BATCH has stream id 0, not {stream_id}")
    view = memoryview(data)
    if not 0 < len(view) - HEADER_BYTES <= MAX_BATCH:
        _fail("batch", f"{len(view) - HEADER_BYTES} bytes of frames, expected 1..{MAX_BATCH}")
    encoded: list[bytes | memoryview] = []
    offset = HEADER_BYTES
    while offset < len(view):
        if offset + _U32.size > len(view):
            _fail("batch", "a frame's length is cut short")
        (length,) = _U32.unpack_from(view, offset)
        offset += _U32.size
        if offset + length > len(view):
            _fail("batch", f"a frame of {length} bytes in {len(view) - offset}")
        encoded.append(view[offset:offset + length])
        offset += length
    return encoded


def decode_frame(data: bytes | memoryview, *,
                 max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> Frame:
    """Decode one frame (not a BATCH: see :func:`split_message`), or raise
    ``ProtocolError("invalid_frame:<what>")``."""
    if len(data) < HEADER_BYTES:
        _fail("short", f"{len(data)} bytes, a frame has at least {HEADER_BYTES}")
    first, stream_id = _PREFIX.unpack_from(data)
    kind, fin, body = first & _TYPE_BITS, bool(first & FIN), bool(first & BODY)
    # the type is checked first, so a receiver can tell a newer peer's frame from garbage
    if kind == FrameType.BATCH:  # split_message unpacks one; none may hold another
        _fail("batch", "a BATCH inside a BATCH")
    if kind not in _DECODERS:
        _fail("unknown_type", f"frame type {kind}" + (" with FIN" if fin else "")
              + (" with BODY" if body else ""))
    if fin and kind not in _FIN_TYPES:
        _fail("fin_not_allowed", f"FIN on a {FrameType(kind).name} frame")
    if body and kind not in _HEAD_TYPES:
        _fail("body_not_allowed", f"BODY on a {FrameType(kind).name} frame")
    if stream_id == 0:
        _fail("stream_id", "stream id 0 is reserved")
    payload = bytes(data[HEADER_BYTES:])
    if body:
        head, data = _split_body(payload)
        return _HEAD_DECODERS[kind](stream_id, head, fin, max_head_bytes, data)
    return _DECODERS[kind](stream_id, payload, fin, max_head_bytes)


def _split_body(payload: bytes) -> tuple[bytes, bytes]:
    """A BODY head's payload: u32 head length, the head's JSON, the first body bytes."""
    if len(payload) < _U32.size:
        _fail("head_length", f"{len(payload)} bytes, a head with BODY has at least 4")
    (length,) = _U32.unpack_from(payload)
    end = _U32.size + length
    if end > len(payload):
        _fail("head_length", f"a head of {length} bytes in {len(payload) - _U32.size}")
    data = payload[end:]
    if len(data) > MAX_DATA:
        _fail("data_too_large", f"{len(data)} > {MAX_DATA} bytes")
    return payload[_U32.size:end], data


def _decode_request_head(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int,
                         data: bytes = b"") -> Frame:
    doc = _head_doc(payload, max_head_bytes)
    method, path = doc.get("method"), doc.get("path")
    if not isinstance(method, str):
        _fail("method", "expected a string")
    if not isinstance(path, str):
        _fail("path", "expected a string")
    upgrade = doc.get("upgrade")
    if upgrade is not None and not isinstance(upgrade, str):
        _fail("upgrade", "expected a string")
    head = RequestHead(method, path, _headers(doc), upgrade)
    _validate(head)
    return RequestHeadFrame(stream_id, head, fin, data)


def _decode_response_head(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int,
                          data: bytes = b"") -> Frame:
    doc = _head_doc(payload, max_head_bytes)
    status = doc.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        _fail("status", "expected an integer")
    head = ResponseHead(status, _headers(doc))
    _validate(head)
    return ResponseHeadFrame(stream_id, head, fin, data)


def _decode_data(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int) -> Frame:
    if len(payload) > MAX_DATA:
        _fail("data_too_large", f"{len(payload)} > {MAX_DATA} bytes")
    return DataFrame(stream_id, payload, fin)


def _decode_end(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int) -> Frame:
    if payload:
        _fail("end_payload", "END carries no payload")
    return EndFrame(stream_id)


def _decode_reset(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int) -> Frame:
    if not 0 < len(payload) <= MAX_RESET_REASON:
        _fail("reset_reason", f"reason of {len(payload)} bytes, expected 1..200")
    try:
        reason = payload.decode()
    except UnicodeDecodeError:
        _fail("reset_reason", "reason is not UTF-8", CLOSE_INVALID_PAYLOAD)
    if _CONTROL.search(reason):  # reasons reach logs: no control characters
        _fail("reset_reason", "reason holds control characters")
    return ResetFrame(stream_id, reason)


def _decode_window(stream_id: int, payload: bytes, fin: bool, max_head_bytes: int) -> Frame:
    if len(payload) != _U32.size:
        _fail("window_increment", f"{len(payload)} bytes, expected 4")
    (increment,) = _U32.unpack(payload)
    if increment == 0:
        _fail("window_increment", "an increment of 0")
    return WindowFrame(stream_id, increment)


_DECODERS = {
    FrameType.REQUEST_HEAD: _decode_request_head,
    FrameType.RESPONSE_HEAD: _decode_response_head,
    FrameType.DATA: _decode_data,
    FrameType.END: _decode_end,
    FrameType.RESET: _decode_reset,
    FrameType.WINDOW: _decode_window,
}
_HEAD_DECODERS = {
    FrameType.REQUEST_HEAD: _decode_request_head,
    FrameType.RESPONSE_HEAD: _decode_response_head,
}
# the frames after which a body may end; END is an end already, RESET and WINDOW are no body
_FIN_TYPES = frozenset({FrameType.REQUEST_HEAD, FrameType.RESPONSE_HEAD, FrameType.DATA})
# the frames that may carry the first body bytes (BODY)
_HEAD_TYPES = frozenset(_HEAD_DECODERS)


def _head_doc(payload: bytes, max_head_bytes: int) -> dict[str, Any]:
    if len(payload) > max_head_bytes:
        _fail("head_too_large", f"{len(payload)} > {max_head_bytes} bytes")
    try:
        doc = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        _fail("head_json", "head is not UTF-8 JSON", CLOSE_INVALID_PAYLOAD)
    if not isinstance(doc, dict):
        _fail("head_json", "head is not a JSON object", CLOSE_INVALID_PAYLOAD)
    return doc


def _headers(doc: dict[str, Any]) -> list[tuple[str, str]]:
    raw = doc.get("headers")
    if not isinstance(raw, list):
        _fail("headers", "expected a list of [name, value] pairs")
    headers: list[tuple[str, str]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            _fail("headers", "expected a list of [name, value] string pairs")
        headers.append((pair[0], pair[1]))
    return headers


def _validate(head: RequestHead | ResponseHead) -> None:
    """The rules both directions share; what an HTTP/1.1 peer could write without injection."""
    if isinstance(head, RequestHead):
        if not _TOKEN.fullmatch(head.method):
            _fail("method", "expected an HTTP method token")
        if not _TARGET.fullmatch(head.path):
            _fail("path", "expected a request target of visible ASCII characters")
        if head.upgrade is not None and (len(head.upgrade) > 64
                                         or not _TOKEN.fullmatch(head.upgrade)):
            _fail("upgrade", "expected a protocol token of at most 64 characters")
    elif isinstance(head.status, bool) or not 100 <= head.status <= 599:
        _fail("status", "expected a status 100..599")
    for name, value in head.headers:
        if not _TOKEN.fullmatch(name):
            _fail("headers", f"header name {name[:40]!r} is not a token")
        if not _FIELD_VALUE.fullmatch(value):
            _fail("headers", f"header {name[:40]!r} has a value with control characters")


def _fail(what: str, detail: str, code: int = CLOSE_PROTOCOL_ERROR) -> NoReturn:
    raise ProtocolError(f"invalid_frame:{what}", detail, code)

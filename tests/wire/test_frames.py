"""The binary frame codec (eecp.frames): round trips, every malformed case, random bytes."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eecp.core.errors import ProtocolError
from eecp.wire.frames import (
    BODY,
    FIN,
    INITIAL_WINDOW,
    MAX_BATCH,
    MAX_DATA,
    DataFrame,
    EndFrame,
    Frame,
    FrameType,
    RequestHeadFrame,
    ResetFrame,
    ResponseHeadFrame,
    WindowFrame,
    batch_size,
    check_head,
    decode_frame,
    encode_batch,
    encode_frame,
    encode_head_frame,
    reset_reason,
    split_message,
)
from eecp.wire.httpmsg import RequestHead, ResponseHead


def raw(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BI", kind, stream_id) + payload


def head_payload(doc: object) -> bytes:
    return json.dumps(doc).encode()


REQUEST = RequestHead("POST", "/v1/items?x=1&y=%20", [
    ("Content-Type", "application/json"), ("X-Dup", "one"), ("x-dup", "two"), ("Empty", "")])
RESPONSE = ResponseHead(201, [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Vary", "é")])


@pytest.mark.parametrize("frame", [
    RequestHeadFrame(1, REQUEST),
    RequestHeadFrame(2**32 - 1, RequestHead("GET", "/", [])),
    ResponseHeadFrame(7, RESPONSE),
    DataFrame(3, b""),
    DataFrame(3, b"\x00\xff" * 10),
    DataFrame(3, bytes(MAX_DATA)),
    RequestHeadFrame(1, REQUEST, fin=True),
    ResponseHeadFrame(7, RESPONSE, fin=True),
    DataFrame(3, b"last", fin=True),
    DataFrame(3, b"", fin=True),
    DataFrame(3, bytes(MAX_DATA), fin=True),
    EndFrame(9),
    ResetFrame(4, "backend_unreachable"),
    ResetFrame(4, "stream_reset:é" + "x" * 180),
    WindowFrame(5, 1),
    WindowFrame(5, 2**32 - 1),
], ids=lambda f: type(f).__name__ + ("+FIN" if getattr(f, "fin", False) else ""))
def test_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    fin = getattr(frame, "fin", False)
    assert data[0] == {RequestHeadFrame: 1, ResponseHeadFrame: 2, DataFrame: 3, EndFrame: 4,
                       ResetFrame: 5, WindowFrame: 6}[type(frame)] | (FIN if fin else 0)
    assert int.from_bytes(data[1:5], "big") == frame.stream_id


def test_fin_is_the_high_bit_of_the_type_byte_and_off_by_default() -> None:
    assert FIN == 0x80
    assert encode_frame(DataFrame(258, b"hi", fin=True)) == b"\x83\x00\x00\x01\x02hi"
    assert encode_frame(RequestHeadFrame(1, RequestHead("GET", "/a", []), fin=True)) == (
        b'\x81\x00\x00\x00\x01{"method":"GET","path":"/a","headers":[]}')
    assert encode_frame(ResponseHeadFrame(1, ResponseHead(204, []), fin=True)) == (
        b'\x82\x00\x00\x00\x01{"status":204,"headers":[]}')
    # without the bit, a frame is not the last one of its direction
    for data in (raw(3, 1, b"x"), raw(1, 1, head_payload(_GOOD_REQ)),
                 raw(2, 1, head_payload(_GOOD_RESP))):
        frame = decode_frame(data)
        assert isinstance(frame, DataFrame | RequestHeadFrame | ResponseHeadFrame)
        assert frame.fin is False
        assert decode_frame(bytes([data[0] | FIN]) + data[1:]) == dataclasses.replace(
            frame, fin=True)


def test_fin_frames_keep_their_payload_rules() -> None:
    with pytest.raises(ProtocolError, match="invalid_frame:data_too_large"):
        decode_frame(raw(3 | FIN, 1, bytes(MAX_DATA + 1)))
    with pytest.raises(ProtocolError, match="invalid_frame:status"):
        decode_frame(raw(2 | FIN, 1, head_payload({**_GOOD_RESP, "status": 99})))
    with pytest.raises(ProtocolError, match="invalid_frame:stream_id"):
        decode_frame(raw(3 | FIN, 0, b"x"))
    with pytest.raises(ValueError):
        encode_frame(DataFrame(1, bytes(MAX_DATA + 1), fin=True))


def test_wire_layout_is_the_documented_one() -> None:
    assert encode_frame(DataFrame(258, b"hi")) == b"\x03\x00\x00\x01\x02hi"
    assert encode_frame(WindowFrame(1, 65536)) == b"\x06\x00\x00\x00\x01\x00\x01\x00\x00"
    assert encode_frame(EndFrame(1)) == b"\x04\x00\x00\x00\x01"
    assert encode_frame(RequestHeadFrame(1, RequestHead("GET", "/a", [("A", "1")]))) == (
        b'\x01\x00\x00\x00\x01{"method":"GET","path":"/a","headers":[["A","1"]]}')
    assert encode_frame(ResponseHeadFrame(1, ResponseHead(204, []))) == (
        b'\x02\x00\x00\x00\x01{"status":204,"headers":[]}')
    assert INITIAL_WINDOW == 64 * 1024


@pytest.mark.parametrize("frame", [
    RequestHeadFrame(1, REQUEST, data=b"a=1&b=2"),
    RequestHeadFrame(1, REQUEST, fin=True, data=b"\x00" * MAX_DATA),
    ResponseHeadFrame(7, RESPONSE, data=b"first chunk"),
    ResponseHeadFrame(7, RESPONSE, fin=True, data=b"{}"),
], ids=["request", "request+FIN full", "response", "response+FIN"])
def test_a_head_with_body_round_trips_with_the_body_flag(frame: Frame) -> None:
    data = encode_frame(frame)
    assert data[0] & BODY and data[0] & 0x3F == (1 if isinstance(frame, RequestHeadFrame) else 2)
    assert decode_frame(data) == frame


def test_a_head_with_body_is_length_head_then_body() -> None:
    head = b'{"status":200,"headers":[]}'
    assert BODY == 0x40
    assert encode_frame(ResponseHeadFrame(1, ResponseHead(200, []), fin=True, data=b"ok")) == (
        b"\xc2\x00\x00\x00\x01" + struct.pack(">I", len(head)) + head + b"ok")
    # no body: no flag, no length (the plain form)
    assert encode_frame(ResponseHeadFrame(1, ResponseHead(200, []), data=b"")) == (
        b"\x02\x00\x00\x00\x01" + head)


def test_a_head_with_body_keeps_the_limits() -> None:
    head = head_payload(_GOOD_RESP)
    framed = struct.pack(">I", len(head)) + head
    for kind in (3, 4, 5, 6):
        with pytest.raises(ProtocolError) as caught:
            decode_frame(raw(kind | BODY, 1, framed))
        assert caught.value.reason == "invalid_frame:body_not_allowed"
        assert caught.value.close_code == 4005
    for payload, what in ((b"\x00\x00", "head_length"),
                          (struct.pack(">I", len(head) + 1) + head, "head_length"),
                          (framed + bytes(MAX_DATA + 1), "data_too_large"),
                          (struct.pack(">I", 3) + b"[1]" + b"x", "head_json")):
        with pytest.raises(ProtocolError, match=f"invalid_frame:{what}"):
            decode_frame(raw(2 | BODY, 1, payload))
    big = RequestHeadFrame(1, RequestHead("GET", "/" + "a" * 200, []), data=b"body")
    with pytest.raises(ProtocolError, match="head_too_large"):  # the head alone is measured
        decode_frame(encode_frame(big), max_head_bytes=200)
    assert decode_frame(encode_frame(big), max_head_bytes=250) == big
    with pytest.raises(ValueError):
        encode_frame(ResponseHeadFrame(1, ResponseHead(200, []), data=bytes(MAX_DATA + 1)))


@pytest.mark.parametrize("frame", [
    RequestHeadFrame(1, REQUEST), RequestHeadFrame(5, REQUEST, fin=True, data=b"abc"),
    ResponseHeadFrame(2**32 - 1, RESPONSE, fin=True), ResponseHeadFrame(3, RESPONSE, data=b"x"),
])
def test_a_checked_head_encodes_as_encode_frame_does(
        frame: RequestHeadFrame | ResponseHeadFrame) -> None:
    assert encode_head_frame(frame, check_head(frame.head)) == encode_frame(frame)


def test_repeated_headers_keep_their_order() -> None:
    frame = decode_frame(encode_frame(ResponseHeadFrame(1, RESPONSE)))
    assert isinstance(frame, ResponseHeadFrame)
    assert frame.head.headers == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Vary", "é")]


def test_unknown_head_keys_are_ignored() -> None:
    data = raw(1, 1, head_payload({"method": "GET", "path": "/", "headers": [], "new": 1}))
    assert decode_frame(data) == RequestHeadFrame(1, RequestHead("GET", "/", []))


_GOOD_REQ = {"method": "GET", "path": "/", "headers": []}
_GOOD_RESP = {"status": 200, "headers": []}

MALFORMED = [
    ("empty", b"", "short", 4005),
    ("four bytes", b"\x03\x00\x00\x00", "short", 4005),
    ("type 0", raw(0, 1), "unknown_type", 4005),
    ("type 8", raw(8, 1, b"x"), "unknown_type", 4005),
    ("type 255", raw(255, 0), "unknown_type", 4005),
    ("type 0 with FIN", raw(0x80, 1), "unknown_type", 4005),
    ("type 8 with FIN", raw(0x88, 1, b"x"), "unknown_type", 4005),
    ("a BATCH is no single frame", raw(7, 0, b"x"), "batch", 4005),
    ("type 127", raw(0x7F, 1, b"x"), "unknown_type", 4005),
    ("FIN on END", raw(0x84, 1), "fin_not_allowed", 4005),
    ("FIN on RESET", raw(0x85, 1, b"closed"), "fin_not_allowed", 4005),
    ("FIN on WINDOW", raw(0x86, 1, b"\x00\x00\x00\x01"), "fin_not_allowed", 4005),
    # the type and its flag are checked before the id, the id before the payload
    ("FIN on END, stream 0", raw(0x84, 0, b"x"), "fin_not_allowed", 4005),
    ("FIN on END with payload", raw(0x84, 1, b"x"), "fin_not_allowed", 4005),
    ("stream 0", raw(3, 0, b"x"), "stream_id", 4005),
    ("data too large", raw(3, 1, bytes(MAX_DATA + 1)), "data_too_large", 4005),
    ("end with payload", raw(4, 1, b"x"), "end_payload", 4005),
    ("reset empty", raw(5, 1), "reset_reason", 4005),
    ("reset too long", raw(5, 1, b"x" * 201), "reset_reason", 4005),
    ("reset not utf-8", raw(5, 1, b"\xff\xfe"), "reset_reason", 1007),
    ("reset control", raw(5, 1, b"a\nb"), "reset_reason", 4005),
    ("window short", raw(6, 1, b"\x00\x01"), "window_increment", 4005),
    ("window long", raw(6, 1, b"\x00\x00\x00\x01\x00"), "window_increment", 4005),
    ("window zero", raw(6, 1, bytes(4)), "window_increment", 4005),
    ("head not json", raw(1, 1, b"{nope"), "head_json", 1007),
    ("head not utf-8", raw(1, 1, b'{"method":"\xff"}'), "head_json", 1007),
    ("head an array", raw(1, 1, b"[]"), "head_json", 1007),
    ("head nests deep", raw(1, 1, b"[" * 60000), "head_json", 1007),
    ("head too large", raw(1, 1, head_payload({**_GOOD_REQ, "pad": "x" * 70000})),
     "head_too_large", 4005),
    ("method missing", raw(1, 1, head_payload({"path": "/", "headers": []})), "method", 4005),
    ("method not token", raw(1, 1, head_payload({**_GOOD_REQ, "method": "G T"})), "method", 4005),
    ("method trailing newline", raw(1, 1, head_payload({**_GOOD_REQ, "method": "GET\n"})),
     "method", 4005),
    ("path missing", raw(1, 1, head_payload({"method": "GET", "headers": []})), "path", 4005),
    ("path empty", raw(1, 1, head_payload({**_GOOD_REQ, "path": ""})), "path", 4005),
    ("path with space", raw(1, 1, head_payload({**_GOOD_REQ, "path": "/a b"})), "path", 4005),
    ("path with CRLF", raw(1, 1, head_payload({**_GOOD_REQ, "path": "/a\r\nX: y"})),
     "path", 4005),
    ("path not ascii", raw(1, 1, head_payload({**_GOOD_REQ, "path": "/é"})), "path", 4005),
    ("headers missing", raw(1, 1, head_payload({"method": "GET", "path": "/"})),
     "headers", 4005),
    ("headers an object", raw(1, 1, head_payload({**_GOOD_REQ, "headers": {"a": "b"}})),
     "headers", 4005),
    ("header not a pair", raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a"]]})),
     "headers", 4005),
    ("header name a number", raw(1, 1, head_payload({**_GOOD_REQ, "headers": [[1, "b"]]})),
     "headers", 4005),
    ("header value a number", raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a", 1]]})),
     "headers", 4005),
    ("header name with colon", raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a:b", "c"]]})),
     "headers", 4005),
    ("header value with CRLF",
     raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a", "b\r\nSet-Cookie: x"]]})),
     "headers", 4005),
    ("header value with NUL", raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a", "\x00"]]})),
     "headers", 4005),
    ("header value beyond latin-1",
     raw(1, 1, head_payload({**_GOOD_REQ, "headers": [["a", "€"]]})), "headers", 4005),
    ("status missing", raw(2, 1, head_payload({"headers": []})), "status", 4005),
    ("status a string", raw(2, 1, head_payload({**_GOOD_RESP, "status": "200"})), "status", 4005),
    ("status a bool", raw(2, 1, head_payload({**_GOOD_RESP, "status": True})), "status", 4005),
    ("status a float", raw(2, 1, head_payload({**_GOOD_RESP, "status": 200.0})), "status", 4005),
    ("status 99", raw(2, 1, head_payload({**_GOOD_RESP, "status": 99})), "status", 4005),
    ("status 600", raw(2, 1, head_payload({**_GOOD_RESP, "status": 600})), "status", 4005),
    ("response headers bad", raw(2, 1, head_payload({**_GOOD_RESP, "headers": "x"})),
     "headers", 4005),
]


@pytest.mark.parametrize(("data", "what", "code"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_frames_are_refused_with_their_reason(data: bytes, what: str, code: int
                                                        ) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_frame(data)
    assert caught.value.reason == f"invalid_frame:{what}"
    assert caught.value.close_code == code


def test_max_head_bytes_is_the_receivers_choice() -> None:
    data = encode_frame(RequestHeadFrame(1, RequestHead("GET", "/" + "a" * 200, [])))
    decode_frame(data, max_head_bytes=len(data) - 5)
    with pytest.raises(ProtocolError, match="head_too_large"):
        decode_frame(data, max_head_bytes=len(data) - 6)


@pytest.mark.parametrize("frame", [
    DataFrame(0, b""),
    DataFrame(2**32, b""),
    DataFrame(1, bytes(MAX_DATA + 1)),
    ResetFrame(1, ""),
    ResetFrame(1, "x" * 201),
    ResetFrame(1, "a\nb"),
    WindowFrame(1, 0),
    WindowFrame(1, 2**32),
    RequestHeadFrame(1, RequestHead("GET", "/a b", [])),
    RequestHeadFrame(1, RequestHead("GET", "/", [("X", "a\r\nb")])),
    ResponseHeadFrame(1, ResponseHead(42, [])),
], ids=repr)
def test_encoding_refuses_what_a_peer_would_refuse(frame: Frame) -> None:
    with pytest.raises(ValueError):
        encode_frame(frame)


def test_check_head_names_the_field_and_the_size() -> None:
    assert check_head(RequestHead("GET", "/", [])) == b'{"method":"GET","path":"/","headers":[]}'
    with pytest.raises(ProtocolError, match="invalid_frame:headers"):
        check_head(ResponseHead(200, [("Bad Name", "x")]))
    with pytest.raises(ProtocolError, match="invalid_frame:head_too_large"):
        check_head(RequestHead("GET", "/", [("X", "y" * 100)]), max_head_bytes=64)


def test_reset_reason_always_fits() -> None:
    assert reset_reason("backend_timeout") == "backend_timeout"
    assert reset_reason("") == "unspecified"
    assert reset_reason("a\r\nb") == "a??b"
    long = reset_reason("é" * 300)
    assert len(long.encode()) <= 200 and long == "é" * 100
    encode_frame(ResetFrame(1, reset_reason("\x00" * 1000)))


# ---- BATCH ------------------------------------------------------------------------------------

_MIXED = [RequestHeadFrame(1, REQUEST, fin=True), ResponseHeadFrame(2, RESPONSE, True, b"hi"),
          DataFrame(3, b"x" * 1000), EndFrame(3), ResetFrame(4, "closed"), WindowFrame(5, 9)]


def test_a_batch_carries_its_frames_in_order() -> None:
    encoded = [encode_frame(frame) for frame in _MIXED]
    message = encode_batch(encoded)
    assert message[:5] == b"\x07\x00\x00\x00\x00"
    assert len(message) == 5 + sum(batch_size(e) for e in encoded)
    assert [decode_frame(e) for e in split_message(message)] == _MIXED
    # a frame that is not a BATCH is its own message
    assert split_message(encoded[2]) == [encoded[2]]
    assert split_message(encode_batch(encoded[:1])) == encoded[:1]


def test_a_batch_holds_at_most_max_batch_bytes() -> None:
    full = encode_frame(DataFrame(1, bytes(MAX_BATCH - 4 - 5)))
    assert batch_size(full) == MAX_BATCH
    assert [decode_frame(e) for e in split_message(encode_batch([full]))] == [
        DataFrame(1, bytes(MAX_BATCH - 9))]
    with pytest.raises(ValueError):
        encode_batch([full, encode_frame(EndFrame(1))])
    with pytest.raises(ValueError):
        encode_batch([])


def _batch(*parts: bytes, kind: int = 7, stream_id: int = 0) -> bytes:
    return raw(kind, stream_id, b"".join(struct.pack(">I", len(p)) + p for p in parts))


_END = encode_frame(EndFrame(1))

MALFORMED_BATCHES = [
    ("short", b"\x07\x00\x00", "short"),
    ("empty", raw(7, 0), "batch"),
    ("FIN", _batch(_END, kind=0x87), "fin_not_allowed"),
    ("BODY", _batch(_END, kind=0x47), "body_not_allowed"),
    ("a stream id", _batch(_END, stream_id=1), "stream_id"),
    ("a length cut short", raw(7, 0, b"\x00\x00\x05"), "batch"),
    ("a length beyond the message", raw(7, 0, b"\x00\x00\x00\x09" + _END), "batch"),
    ("a frame past the lengths", _batch(_END) + b"\x00", "batch"),
    ("too large", _batch(encode_frame(DataFrame(1, bytes(MAX_DATA - 8)))), "batch"),
    ("nested", _batch(_END, _batch(_END)), "batch"),
    ("an invalid frame inside", _batch(_END, raw(3, 0, b"x")), "stream_id"),
    ("an empty frame inside", _batch(_END, b""), "short"),
]


@pytest.mark.parametrize(("data", "what"), [m[1:] for m in MALFORMED_BATCHES],
                         ids=[m[0] for m in MALFORMED_BATCHES])
def test_malformed_batches_are_refused_with_their_reason(data: bytes, what: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        for encoded in split_message(data):
            decode_frame(encoded)
    assert caught.value.reason == f"invalid_frame:{what}"
    assert caught.value.close_code == 4005


@given(st.binary(max_size=300))
def test_random_batches_raise_nothing_but_protocol_error(tail: bytes) -> None:
    try:
        for encoded in split_message(raw(7, 0, tail)):
            decode_frame(encoded, max_head_bytes=200)
    except ProtocolError as exc:
        assert exc.reason.startswith("invalid_frame:")
        assert exc.close_code in (1007, 4005)


@given(st.binary(max_size=300))
def test_random_bytes_raise_nothing_but_protocol_error(data: bytes) -> None:
    try:
        decode_frame(data, max_head_bytes=200)
    except ProtocolError as exc:
        assert exc.reason.startswith("invalid_frame:")
        assert exc.close_code in (1007, 4005)


@given(st.sampled_from(list(FrameType)), st.booleans(), st.integers(0, 2**32 - 1),
       st.binary(max_size=300))
def test_random_payloads_raise_nothing_but_protocol_error(kind: FrameType, fin: bool,
                                                          stream_id: int, payload: bytes) -> None:
    try:
        frame = decode_frame(raw(kind | (FIN if fin else 0), stream_id, payload))
    except ProtocolError as exc:
        assert exc.close_code in (1007, 4005)
        if fin and kind in (FrameType.END, FrameType.RESET, FrameType.WINDOW):
            assert exc.reason == "invalid_frame:fin_not_allowed"
    else:  # whatever decodes re-encodes to a frame that decodes the same, its FIN included
        assert getattr(frame, "fin", False) is fin
        assert decode_frame(encode_frame(frame)) == frame


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@given(st.sampled_from([1, 2]), st.dictionaries(
    st.sampled_from(["method", "path", "headers", "status", "other"]), _JSONISH))
def test_random_heads_raise_nothing_but_protocol_error(kind: int, doc: dict[str, object]
                                                       ) -> None:
    try:
        decode_frame(raw(kind, 1, json.dumps(doc).encode()))
    except ProtocolError as exc:
        assert exc.reason.startswith("invalid_frame:")


_TOKENS = st.text(alphabet="!#$%&'*+-.^_`|~abcXYZ019", min_size=1, max_size=12)
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                         blacklist_characters="\x7f"), max_size=30)


@given(_TOKENS, st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                        min_size=1, max_size=40),
       st.lists(st.tuples(_TOKENS, _VALUES), max_size=8), st.integers(1, 2**32 - 1),
       st.booleans())
def test_valid_request_heads_round_trip(method: str, path: str, headers: list[tuple[str, str]],
                                        stream_id: int, fin: bool) -> None:
    frame = RequestHeadFrame(stream_id, RequestHead(method, path, headers), fin)
    assert decode_frame(encode_frame(frame)) == frame

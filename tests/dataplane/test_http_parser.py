"""The HTTP server's parser (``eecp.dataplane.http.parser``), sans I/O: bytes in, requests,
bodies and refusals out, synchronously (as h11's tests go). The same rules over real sockets,
with the timeouts the parser does not own, are tests/dataplane/test_httpserver.py's."""

from __future__ import annotations

import pytest

from eecp.dataplane.http import DEFAULT_LIMITS
from eecp.dataplane.http.parser import (
    BETWEEN,
    BODY,
    HEAD,
    ParsedRequest,
    RequestError,
    RequestParser,
)

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: t\r\nX-Test: 1\r\n\r\n"
CHUNKED = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def parser(*, max_head_bytes: int = DEFAULT_LIMITS.max_head_bytes,
           max_headers: int = DEFAULT_LIMITS.max_headers,
           max_body_bytes: int | None = None) -> RequestParser[ParsedRequest]:
    return RequestParser(ParsedRequest, max_head_bytes=max_head_bytes, max_headers=max_headers,
                         max_body_bytes=max_body_bytes)


def fed(*pieces: bytes, **limits: int) -> RequestParser[ParsedRequest]:
    p = parser(**limits)
    for piece in pieces:
        p.feed(piece)
    return p


def requests(p: RequestParser[ParsedRequest]) -> list[ParsedRequest]:
    """The requests ``p`` parsed so far (not the refusal that may follow them)."""
    return [item for item in p.pending if isinstance(item, ParsedRequest)]


def refusal(p: RequestParser[ParsedRequest]) -> tuple[int, str]:
    """The refusal that ends ``p``'s input: the last pending item, or the error its body met."""
    last = p.pending[-1] if p.pending else None
    error = last if isinstance(last, RequestError) else last._error if last else None
    assert error is not None, list(p.pending)
    assert p.done
    return error.http_status, error.reason


def body(p: RequestParser[ParsedRequest], request: ParsedRequest) -> bytes:
    chunks = []
    while request._chunks:
        chunks.append(p.take(request))
    return b"".join(chunks)


def test_a_request_head() -> None:
    p = fed(GET)
    (request,) = requests(p)
    assert (request.method, request.target, request.path, request.query) == (
        "GET", "/a?b=1", "/a", "b=1")
    assert request.http_version == "1.1" and request.keep_alive
    assert request.headers == [("host", "t"), ("x-test", "1")]
    assert request.header("X-TEST") == "1" and request.header("nope") is None
    assert request._complete and p.state == BETWEEN and not p.done


def test_a_request_split_over_feeds_byte_by_byte_is_the_same_request() -> None:
    p = parser()
    data = GET.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\nabc")
    states = []
    for i in range(len(data)):
        p.feed(data[i:i + 1])
        states.append(p.state)
    (request,) = requests(p)
    assert request.headers == [("host", "t"), ("x-test", "1"), ("content-length", "3")]
    assert request.content_length == 3 and body(p, request) == b"abc" and request._complete
    assert states[0] == HEAD and BODY in states and states[-1] == BETWEEN
    assert p.messages == 1


def test_pipelined_requests_come_out_in_order_with_their_bodies() -> None:
    post = b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
    p = fed(GET + post + GET.replace(b"/a?b=1", b"/c"))
    first, second, third = requests(p)
    assert [r.path for r in (first, second, third)] == ["/a", "/p", "/c"]
    assert body(p, second) == b"hi" and p.buffered == 0
    assert not first._chunks and not third._chunks
    assert p.messages == 3 and p.state == BETWEEN


def test_a_chunked_body_arrives_chunk_by_chunk_and_is_accounted() -> None:
    p = fed(CHUNKED + b"3\r\nabc\r\n")
    (request,) = requests(p)
    assert p.state == BODY and p.current is request and not request._complete
    assert p.buffered == 3 and request._received == 3
    assert p.take(request) == b"abc" and p.buffered == 0 and request._consumed == 3
    p.feed(b"5\r\nhello\r\n0\r\n\r\n")
    assert body(p, request) == b"hello" and request._complete
    assert p.current is None and p.state == BETWEEN


def test_trailers_are_dropped_never_merged_into_the_head() -> None:
    p = fed(CHUNKED + b"3\r\nabc\r\n0\r\nX-Test: trailer\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"Host: evil\r\n\r\n" + GET)
    first, second = requests(p)
    assert first.headers == [("host", "t"), ("transfer-encoding", "chunked")]
    assert body(p, first) == b"abc" and first._complete
    assert second.headers == [("host", "t"), ("x-test", "1")]  # the next head starts afresh


@pytest.mark.parametrize(("trailers", "reason"), [
    ([f"X-{i}: {i}" for i in range(11)], "too_many_headers"),
    ([f"X-{i}: {'a' * 200}" for i in range(8)], "header_too_large"),
])
def test_trailer_sections_are_bounded_like_heads(trailers: list[str], reason: str) -> None:
    section = "".join(f"{t}\r\n" for t in trailers).encode()
    p = fed(CHUNKED + b"3\r\nabc\r\n0\r\n" + section + b"\r\n", max_head_bytes=1024,
            max_headers=10)
    (request,) = requests(p)
    assert body(p, request) == b"abc"  # what came before the refusal is the handler's
    assert refusal(p) == (431, reason)


def test_forgotten_body_is_skipped_as_it_arrives_but_still_counted() -> None:
    p = fed(CHUNKED + b"3\r\nabc\r\n", max_body_bytes=10)
    (request,) = requests(p)
    p.forget(request)
    assert p.buffered == 0 and not request._chunks and request._consumed == 3
    p.feed(b"4\r\ndefg\r\n")
    assert not request._chunks and request._consumed == request._received == 7
    p.feed(b"4\r\nhijk\r\n")  # 11 bytes in all: over the limit although nobody keeps them
    assert refusal(p) == (413, "body_too_large")


def test_a_request_that_closes_ends_the_input() -> None:
    p = fed(GET.replace(b"X-Test: 1", b"Connection: close") + GET)
    (request,) = requests(p)  # what follows is not parsed: nobody will answer it
    assert not request.keep_alive and p.done
    p.feed(GET)
    assert len(p.pending) == 1


def test_an_upgrade_ends_the_input_and_does_not_keep_alive() -> None:
    p = fed(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"\x81\x05hello")
    (request,) = requests(p)
    assert not request.keep_alive and p.done


def test_expect_continue_is_owed_until_the_body_is_complete() -> None:
    p = fed(b"PUT /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    (request,) = requests(p)
    assert request._expect_continue
    p.feed(b"ok")
    assert not request._expect_continue and request._complete
    http10 = requests(fed(b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"))
    assert not http10[0]._expect_continue  # no 100 Continue in HTTP/1.0


def test_http10_keeps_alive_only_when_asked() -> None:
    assert not requests(fed(b"GET / HTTP/1.0\r\n\r\n"))[0].keep_alive
    assert requests(fed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))[0].keep_alive


@pytest.mark.parametrize(("data", "status", "reason"), [
    (b"NOT HTTP\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.2\r\n\r\n", 505, "http_version_not_supported"),
    (b"GET / HTTP/3.0\r\n\r\n", 505, "http_version_not_supported"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
     "unsupported_transfer_encoding"),
    (b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 413, "body_too_large"),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 431, "header_too_large"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 11 + b"\r\n", 431, "too_many_headers"),
])
def test_refusals(data: bytes, status: int, reason: str) -> None:
    p = fed(data, max_head_bytes=256, max_headers=10, max_body_bytes=10)
    assert not requests(p)
    assert refusal(p) == (status, reason)


def test_a_refusal_follows_the_requests_before_it() -> None:
    p = fed(GET + b"GET / HTTP/1.2\r\n\r\n")
    first, second = p.pending
    assert isinstance(first, ParsedRequest) and isinstance(second, RequestError)
    assert second.reason == "http_version_not_supported" and p.done


def test_a_chunked_body_over_the_limit_is_413_after_what_came_before() -> None:
    p = fed(CHUNKED + b"6\r\nabcdef\r\n6\r\nghijkl\r\n", max_body_bytes=10)
    (request,) = requests(p)
    assert body(p, request) == b"abcdef"
    assert refusal(p) == (413, "body_too_large")


def test_a_head_dripped_without_end_is_431_though_no_field_ends() -> None:
    # llhttp holds an unfinished field: the bytes fed inside one head are what bound it
    p = fed(b"GET / HTTP/1.1\r\nX-Drip: ", *[b"a" * 100] * 3, max_head_bytes=256)
    assert p.state == HEAD
    assert refusal(p) == (431, "header_too_large")


@pytest.mark.parametrize("tail", [b"0\r\nX-Drip: ", b"3;ext="])
def test_endless_chunk_framing_is_431_not_memory(tail: bytes) -> None:
    p = fed(CHUNKED + b"3\r\nabc\r\n" + tail, *[b"a" * 100] * 3, max_head_bytes=256)
    (request,) = requests(p)
    assert body(p, request) == b"abc"
    assert refusal(p) == (431, "header_too_large")


def test_a_stopped_parser_parses_nothing_more() -> None:
    p = parser()
    p.stop()
    p.feed(GET)
    assert p.done and not p.pending

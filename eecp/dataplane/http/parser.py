"""Requests out of bytes, sans I/O: llhttp (httptools) behind the server's limits.

:meth:`RequestParser.feed` takes what one read brought and leaves its results behind:

* ``pending``: the requests whose heads are complete, in order, each a :class:`ParsedRequest`
  (or what ``new_request`` makes: the connection's :class:`~eecp.dataplane.http.Request`),
  or the :class:`RequestError` that refuses the next one;
* each request's body, as it arrives, in its ``_chunks`` (taken with :meth:`take`, dropped
  with :meth:`forget`), ``_complete`` at its end, or ``_error`` when it went wrong part way
  (the handler sees it after the chunks before it);
* ``state`` (between requests, in a head, in a body) and ``done``: nothing more is parsed
  (the input was malformed, a request asked to close or to upgrade, a limit was hit).

Limits are the parser's, because only it sees where bytes belong: the head's size and its
number of fields (431), a body's declared or actual size (413), one transfer coding only
(501), HTTP/1.0 and 1.1 only (505), one Host (400). llhttp buffers an unfinished header field
until the next one starts, so callbacks alone cannot bound a head: the bytes fed while one
head is unfinished are counted too, and so are those fed in a body that made no progress (all
chunk framing, or one endless trailer field). A chunked body's trailer fields are read and
dropped, bounded like a head. Timeouts are not here: they are the connection's
(:mod:`eecp.dataplane.http.connection`), which reads ``state`` to know which one runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import httptools

from eecp.core.errors import EecpError

#: requests parsed ahead and not yet handled, at most (see :class:`RequestParser`)
MAX_PIPELINED = 64
# Parser states (where the next byte of input belongs).
BETWEEN, HEAD, BODY = 0, 1, 2

_METHODS: dict[bytes, str] = {}
# Request headers the parser callback has to look at; every other header is only stored.
_NOTABLE = frozenset({"content-length", "transfer-encoding", "expect", "host"})


class RequestError(EecpError):
    """The client's request cannot be served: answered with ``http_status`` and
    ``{"error": reason}``, then the connection closes. Raised by :meth:`Request.body_chunks`
    (``body_timeout``, ``body_too_large``, ``bad_request``); a handler may raise it too."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.http_status = status


class ParsedRequest:
    """One request as parsed: its head, and its body as far as it has arrived.

    ``headers`` keeps the order and repeats of the request, names lower-cased.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_consumed",
        "_error",
        "_expect_continue",
        "_forgotten",
        "_received",
        "content_length",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "target",
        "upgrading",
    )

    def __init__(self, method: str, target: str, http_version: str,
                 headers: list[tuple[str, str]], keep_alive: bool, content_length: int | None,
                 expect_continue: bool) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.http_version = http_version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self._chunks: deque[bytes] = deque()
        self._received = 0  # body bytes parsed so far
        self._consumed = 0  # body bytes taken by the handler (or drained)
        self._complete = False  # the parser saw the end of the body
        self._error: RequestError | None = None  # raised once the buffered chunks are taken
        self._expect_continue = expect_continue  # a 100 Continue is still owed
        self._forgotten = False  # answered: the rest of the body is skipped, not kept
        #: llhttp saw an upgrade request (``Connection: upgrade`` and ``Upgrade``): what
        #: follows its head is another protocol, kept in the parser's ``upgrade_tail``
        self.upgrading = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


R = TypeVar("R", bound=ParsedRequest)
#: makes a request from its head: method, target, HTTP version, headers, keep-alive,
#: Content-Length, whether a 100 Continue is owed
NewRequest = Callable[[str, str, str, list[tuple[str, str]], bool, int | None, bool], R]


class _Ignored(Exception):
    """Raised from a parser callback to stop parsing input nobody will answer."""


class RequestParser(Generic[R]):
    """One connection's input, request after request (see the module's docstring).

    Its ``on_*`` methods are llhttp's callbacks (synchronous, inside :meth:`feed`)."""

    def __init__(self, new_request: NewRequest[R], *, max_head_bytes: int, max_headers: int,
                 max_body_bytes: int | None, max_pending: int = MAX_PIPELINED) -> None:
        self._new_request = new_request
        #: requests parsed ahead and not yet handled, at most: the one that reaches it closes
        #: the connection after its answer, and what follows it is not parsed (one read of
        #: 64 KiB holds thousands of tiny pipelined requests, each an object held until its
        #: turn: the bound is the memory one connection may take)
        self._max_pending = max_pending
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers
        self._max_body_bytes = max_body_bytes
        self._llhttp = httptools.HttpRequestParser(self)
        #: requests not yet handled (or the refusal that ends the connection)
        self.pending: deque[R | RequestError] = deque()
        self.buffered = 0  # body bytes parsed but not yet taken, over all requests
        self.done = False  # nothing more will be parsed: error, close, upgrade, stop()
        self.state = BETWEEN
        self.messages = 0  # requests begun so far
        self.current: R | None = None  # the request whose body is being parsed
        self._head_bytes = 0  # request line and headers seen by callbacks
        self._head_fed = 0  # bytes fed while inside one head (what httptools may be holding)
        # In a body, a read that made no progress (no body byte, chunk or trailer field) is
        # all chunk framing or one unfinished trailer field: httptools holds the latter too.
        self._body_fed = 0
        self._progressed = False
        self._host_seen = False
        self._trailer_bytes = self._trailer_fields = 0
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._content_length: int | None = None
        self._expect_continue = False
        self._closing = False  # a request without keep-alive was parsed: ignore what follows
        self._parse_error: RequestError | None = None  # raised by a callback
        #: the bytes after an upgrade request's head in the read that brought it (the new
        #: protocol's first bytes: a client may send them before it saw the 101)
        self.upgrade_tail = b""

    def feed(self, data: bytes) -> None:
        """Parse the next bytes from the client (not empty: the end of input is the
        connection's to handle); nothing once :attr:`done`."""
        if self.done:
            return
        head_of = self.messages if self.state == HEAD else -1
        self._progressed = False
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.done = True  # what follows is another protocol; the request closes
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.upgrade_tail = bytes(data[offset:])
            return
        except httptools.HttpParserError as exc:
            if not self._closing:
                self._on_parse_error(exc)
            self.done = True
            return
        if self._closing:
            self.done = True
        elif self.state == HEAD:
            if self.messages == head_of:
                # Every byte of this read belongs to one unfinished head; httptools buffers a
                # header until the next one starts, so callbacks alone cannot bound it.
                self._head_fed += len(data)
                if self._head_fed > self._max_head_bytes:
                    self.pending.append(RequestError(431, "header_too_large"))
                    self.done = True
        elif self.state == BODY and self.current is not None:
            self._body_fed = 0 if self._progressed else self._body_fed + len(data)
            if self._body_fed > self._max_head_bytes:
                # endless chunk extensions or trailer field: refused like an endless header
                self.current._error = RequestError(431, "header_too_large",
                                                   "chunk framing or trailer field too long")
                self.done = True

    def stop(self) -> None:
        """Parse nothing more (the client left, or a timeout ended its input)."""
        self.done = True

    def take(self, request: R) -> bytes:
        """The next buffered chunk of ``request``'s body (there is one), now consumed."""
        chunk = request._chunks.popleft()
        request._consumed += len(chunk)
        self.buffered -= len(chunk)
        return chunk

    def forget(self, request: R) -> None:
        """Drop what is buffered of ``request``'s body; what has not arrived yet is skipped
        as it is parsed (it still counts against the body's limit)."""
        request._forgotten = True
        self.buffered -= request._received - request._consumed
        request._consumed = request._received
        request._chunks.clear()

    def _on_parse_error(self, exc: httptools.HttpParserError) -> None:
        error = self._parse_error or _classify(exc)
        if self.state == BODY and self.current is not None:
            self.current._error = error  # the handler sees it after the chunks before it
        else:
            self.pending.append(error)

    def _fail(self, status: int, reason: str, detail: str = "") -> None:
        self._parse_error = RequestError(status, reason, detail)
        raise self._parse_error  # httptools turns it into HttpParserCallbackError

    # ---- llhttp callbacks (synchronous, inside feed_data) ------------------------------------

    def on_message_begin(self) -> None:
        if self._closing:
            raise _Ignored  # after a request that closes the connection: not ours to parse
        self.messages += 1
        self.state = HEAD
        self._url = b""
        self._headers = []
        self._head_bytes = self._head_fed = self._body_fed = 0
        self._host_seen = False
        self._trailer_bytes = self._trailer_fields = 0
        self._content_length = None
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head_bytes:
            self._fail(431, "header_too_large")
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state == BODY:
            self._on_trailer(name, value)
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            self._fail(431, "header_too_large")
        if len(self._headers) >= self._max_headers:
            self._fail(431, "too_many_headers")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers.append((key, text))
        if key in _NOTABLE:
            self._notable_header(key, text)

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        # A chunked body's trailer fields are read and dropped: never merged into the head
        # (they would override headers already checked, such as X-Forwarded-* or X-EE-App)
        # and never forwarded (the tunnel carries no trailers). Bounded like a head.
        self._progressed = True
        self._trailer_bytes += len(name) + len(value) + 4
        self._trailer_fields += 1
        if self._trailer_bytes > self._max_head_bytes:
            self._fail(431, "header_too_large", "trailer section")
        if self._trailer_fields > self._max_headers:
            self._fail(431, "too_many_headers", "trailer section")

    def on_chunk_header(self) -> None:
        self._progressed = True

    def _notable_header(self, key: str, value: str) -> None:
        if key == "transfer-encoding":
            if value.strip().lower() != "chunked":
                self._fail(501, "unsupported_transfer_encoding", value)
        elif key == "content-length":
            self._content_length = int(value)  # llhttp has checked it is digits
            limit = self._max_body_bytes
            if limit is not None and self._content_length > limit:
                self._fail(413, "body_too_large")
        elif key == "host":
            if self._host_seen:  # RFC 9112 3.2: which one names the app? refuse instead
                self._fail(400, "bad_request", "more than one Host")
            self._host_seen = True
        elif value.strip().lower() == "100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        llhttp = self._llhttp
        version = llhttp.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(505, "http_version_not_supported", version)
        raw_method = llhttp.get_method()
        method = _METHODS.get(raw_method)
        if method is None:  # llhttp knows a few dozen methods: the table stays small
            method = _METHODS[raw_method] = raw_method.decode("ascii")
        keep_alive = (llhttp.should_keep_alive() and not llhttp.should_upgrade()
                      and len(self.pending) + 1 < self._max_pending)
        request = self._new_request(
            method, self._url.decode("latin-1"), version, self._headers, keep_alive,
            self._content_length, self._expect_continue and version == "1.1")
        request.upgrading = llhttp.should_upgrade()
        self.current = request
        self.state = BODY
        self.pending.append(request)

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None
        self._progressed = True
        request._received += len(body)
        limit = self._max_body_bytes
        if limit is not None and request._received > limit:
            self._fail(413, "body_too_large")
        if request._forgotten:
            request._consumed += len(body)
            return
        request._chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        request._complete = True
        request._expect_continue = False
        self.current = None
        self.state = BETWEEN
        self._closing = not request.keep_alive


def _classify(exc: httptools.HttpParserError) -> RequestError:
    detail = str(exc)
    if "HTTP version" in detail:  # llhttp: "Invalid HTTP version" (HTTP/1.2, HTTP/3.0, ...)
        return RequestError(505, "http_version_not_supported", detail)
    return RequestError(400, "bad_request", detail)

"""A lean HTTP/1.1 server: httptools (llhttp) parsing over trio streams.

It serves the data plane: the proxy listener (any method and path, bodies streamed both ways,
never held whole in memory) and the auth listener (tiny JSON answers, many thousands a second).
Handlers are ``async def handler(request, responder)``; :func:`serve_http` runs them.

The package, layer by layer (each module imports only those listed before it)::

    parser.py      bytes → requests, sans I/O: llhttp behind the head, body and trailer limits
    encoding.py    status lines, header blocks, the Date line: pure
    connection.py  one connection's I/O, its guard and timeouts; Request and Responder
    server.py      serve_http, serve_http_listeners: accepting, the connection cap

Decisions a handler author should know:

* **Pipelining.** Requests are parsed ahead (at most :data:`MAX_QUEUED_REQUESTS` while a slow
  handler runs, or what one read brings) but handled strictly in order, so responses leave in
  order.
* **Unread bodies.** When a handler answers without reading the whole request body, the server
  discards what is left if that is at most :data:`DRAIN_BYTES` (known from Content-Length, or
  already received) and keeps the connection; otherwise it answers with ``Connection: close`` and
  closes. A body held back by ``Expect: 100-continue`` is never solicited just to be drained.
* **Backpressure.** The body is read from the socket when the handler asks for the next chunk,
  so a slow upstream slows the client down instead of filling memory. While a slow handler is
  watched, the guard reads ahead at most :data:`BODY_BUFFER_BYTES` of body, then stops. The
  body gap timeout only runs while the server waits for body bytes, never while it is busy.
* **Slow clients.** Besides the gap timeout and ``send_timeout_sec``, an optional minimum
  rate (:attr:`Limits.min_rate_bytes_sec`, judged per :attr:`Limits.rate_grace_sec` of time
  spent waiting on the client) ends a body that trickles (408 ``body_too_slow``) and a
  connection whose client takes less than that of a response; a response's progress is what
  the client acknowledged (``TIOCOUTQ``), not what the kernel buffered.
* **Disconnects.** End of input (EOF or reset) while a request is being handled cancels its
  handler (a body read raises :class:`ClientDisconnected` first if that is where it was). A
  half-close (shutdown of the client's sending side) counts as gone too, as with nginx and
  uvicorn. A handler quicker than :data:`WATCH_AFTER_SEC` is not watched; while the guard has
  stopped reading on full buffers, a disconnect is noticed at the handler's next read or write.
* **Errors.** Malformed input gets a small JSON answer ``{"error": reason}`` and the connection
  closes: 400 ``bad_request``, 408 ``header_timeout``/``body_timeout``, 413 ``body_too_large``,
  431 ``header_too_large``/``too_many_headers``, 501 ``unsupported_transfer_encoding``,
  505 ``http_version_not_supported``. A handler that raises gets 500 ``internal_error`` (or the
  status of a :class:`RequestError` it let through) if nothing was sent yet, else the
  connection is closed.
* **Connection cap.** :func:`serve_http` holds at most ``max_connections`` at once (the data
  plane's are sized from the file limit: :mod:`eecp.core.capacity`). At the cap a new connection
  closes the oldest idle one (accepted and silent, or kept alive with no byte of a next
  request), never one with a request under way; with none idle it is closed at once.
* **Upgrades.** An ``Upgrade`` request is handed to the handler like any other
  (``request.upgrading`` says llhttp saw one), and the connection closes after its answer,
  unless the handler answers 101 with :meth:`Responder.switch_protocols`: the connection is
  then the handler's raw byte stream (:class:`~eecp.dataplane.http.connection.Upgraded`,
  the bytes that came after the head first) until it returns; the server's timeouts and guard
  stand aside, the handler keeps its own time.
* **Not supported:** ``CONNECT``, trailers, HTTP/2.
"""

from eecp.dataplane.http.connection import (
    DEFAULT_LIMITS,
    HOLD_BYTES,
    ClientDisconnected,
    Handler,
    Limits,
    Request,
    Responder,
)
from eecp.dataplane.http.parser import RequestError
from eecp.dataplane.http.server import DEFAULT_MAX_CONNECTIONS, serve_http, serve_http_listeners

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_CONNECTIONS",
    "HOLD_BYTES",
    "ClientDisconnected",
    "Handler",
    "Limits",
    "Request",
    "RequestError",
    "Responder",
    "serve_http",
    "serve_http_listeners",
]

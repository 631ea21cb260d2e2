"""Listening: :func:`serve_http` and :func:`serve_http_listeners` accept connections and run
each as a :class:`~eecp.dataplane.http.connection.Connection`, behind the listener's
connection cap (:class:`~eecp.core.capacity.ConnectionGate`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import trio

from eecp.core.capacity import ConnectionGate, quiet_accept_errors
from eecp.dataplane.http.connection import DEFAULT_LIMITS, Connection, Handler, Limits

log = logging.getLogger("eecp.httpserver")

DEFAULT_MAX_CONNECTIONS = 1000
"""Connections a listener holds at once unless told otherwise (the data plane's listeners are
sized from the file limit: :mod:`eecp.core.capacity`)."""


async def serve_http(handler: Handler, host: str, port: int, *, limits: Limits = DEFAULT_LIMITS,
                     max_connections: int = DEFAULT_MAX_CONNECTIONS, name: str = "HTTP listener",
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``handler`` on ``host:port`` (0: any free port) until cancelled; reports the bound
    port through ``task_status``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_http_listeners(handler, listeners, limits=limits, task_status=task_status,
                               gate=ConnectionGate(name, max_connections))


async def serve_http_listeners(
    handler: Handler, listeners: Sequence[trio.SocketListener], *,
    limits: Limits = DEFAULT_LIMITS, gate: ConnectionGate | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on listeners the caller opened (and tuned); reports the first one's
    port. Every connection task runs in a nursery owned by this call. ``gate`` caps the
    connections of all of them together (see :mod:`eecp.core.capacity`); by default at
    :data:`DEFAULT_MAX_CONNECTIONS`."""
    port: int = listeners[0].socket.getsockname()[1]
    gate = gate or ConnectionGate("HTTP listener", DEFAULT_MAX_CONNECTIONS)
    quiet_accept_errors()  # trio's accept loop: EMFILE is one line a minute, not ten a second
    serve_one = partial(_serve_connection, handler, limits, gate)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_one, list(listeners))
        task_status.started(port)


async def _serve_connection(handler: Handler, limits: Limits, gate: ConnectionGate,
                            stream: trio.SocketStream) -> None:
    if not gate.admit():
        # at the cap with nobody idle: accepted only to be closed (trio.serve_listeners closes
        # it as we return), rather than left to fill the kernel's backlog
        return
    try:
        await Connection(stream, handler, limits, gate).run()
    except Exception:
        # A bug of ours must cost one connection, not the listener and every other client.
        log.exception("HTTP connection failed")
    finally:
        gate.leave()
        await trio.aclose_forcefully(stream)


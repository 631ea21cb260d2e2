"""WebSocket apps and clients for the tests of WebSockets through the tunnel (issue 17 part 2).

* :func:`serve_echo` — a real WebSocket server (trio-websocket): every message comes back as
  it came (text as text, binary as binary); the text ``close:<code>:<reason>`` makes it close
  with that code instead; ``/headers`` first sends the handshake's headers as JSON text.
* :class:`RawEcho` — a raw TCP app: it answers the handshake by hand, then records every byte
  it receives and sends each back untouched (masked client frames and all), so a test can
  compare bytes, not messages.
* :func:`raw_handshake` — a raw client's handshake, for bytes made by hand (fragments, pings).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

MIB = 1024 * 1024
#: the largest message the test servers and clients take (the 1 MiB one and then some)
MAX_MESSAGE = 4 * MIB
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    if request.path.startswith("/headers"):
        await ws.send_message(json.dumps({k.decode().lower(): v.decode()
                                          for k, v in request.headers}))
    try:
        while True:
            message = await ws.get_message()
            if isinstance(message, str) and message.startswith("close:"):
                _, code, reason = message.split(":", 2)
                await ws.aclose(int(code), reason)
                return
            await ws.send_message(message)
    except ConnectionClosed:
        pass


async def serve_echo(task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Run the echo app on a free loopback port (``http://127.0.0.1:<server.port>``)."""
    await serve_websocket(_echo, "127.0.0.1", 0, None, max_message_size=MAX_MESSAGE,
                          task_status=task_status)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2), any length."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x80 * fin | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 * fin | opcode, 0x80 | 126)) + struct.pack("!H", size)
    else:
        head = bytes((0x80 * fin | opcode, 0x80 | 127)) + struct.pack("!Q", size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """An HTTP head read off a raw stream, and the bytes that came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"closed before a whole head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def raw_handshake(port: int, app: str, path: str = "/raw"
                        ) -> tuple[trio.SocketStream, bytes, bytes]:
    """A raw client's WebSocket handshake through eecp's proxy listener: the stream, the
    101's head, and any bytes after it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET %s HTTP/1.1\r\nHost: %s.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (path.encode(), app.encode(), key))
    head, rest = await read_head(stream)
    return stream, head, rest


@dataclass
class RawEcho:
    """A WebSocket app that never parses a frame: it echoes bytes (see the module)."""

    url: str = ""
    received: bytearray = field(default_factory=bytearray)

    async def serve(self, task_status: trio.TaskStatus[RawEcho] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        head, rest = await read_head(stream)
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                              % accept_key(key))
        data = rest
        try:
            while True:
                if data:
                    self.received += data
                    await stream.send_all(data)
                data = await stream.receive_some(65536)
                if not data:
                    return
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


async def serve_echo_with_health(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                                 ) -> None:
    """The echo app behind a front door that also answers plain HTTP (``200 ok``: the real
    agent's health probe) and passes every WebSocket handshake, bytes and all, to
    :func:`serve_echo`; reports the front door's ``http://`` URL."""
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(serve_echo)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, partial(_door, server.port), listeners)
        task_status.started(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")


async def _door(echo_port: int, stream: trio.SocketStream) -> None:
    try:
        head, rest = await read_head(stream)
    except (AssertionError, trio.BrokenResourceError):
        return
    if b"upgrade: websocket" not in head.lower():
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close"
                              b"\r\n\r\nok")
        return
    async with await trio.open_tcp_stream("127.0.0.1", echo_port) as echo:
        await echo.send_all(head + b"\r\n\r\n" + rest)

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
                await sink.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, stream, echo)
            nursery.start_soon(pump, echo, stream)

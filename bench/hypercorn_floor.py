"""Floor bench: what an idle WebSocket costs on bare hypercorn, with no eecp session behind it.

Run by hand from the repository root (not part of the test suite)::

    python bench/hypercorn_floor.py --sockets 1000 [--tasks 4]

The server is this file with ``--serve`` in a subprocess: hypercorn's trio worker configured as
``eecp serve`` configures it (``eecp.patches.hypercorn``, ``eecp.patches.wsproto``, keep-alive,
pings, message size) serving a bare ASGI app that accepts every WebSocket and waits for its
disconnect. With ``--tasks K`` the app also runs K tasks per connection, each waiting on a trio
Event in one nursery, as an eecp session's tasks wait (reader, attestation, health, TTL).

The client (this process) opens one warm-up WebSocket, reads the server's RSS, opens N more
with trio-websocket (as eecp's agent does), lets them settle, reads RSS again and prints
(RSS with N+1 - RSS with 1) / N, the figure ``bench/tunnels.py`` prints for eecp. The
difference between the two is what eecp's session adds on top of hypercorn.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/hypercorn_floor.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import trio  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402


def rss_kib(pid: int) -> int:
    """The process's resident set, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def serve(port: int, tasks: int) -> None:
    """The bare server: hypercorn as eecp configures it, an app that only waits."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from eecp.patches import hypercorn as hypercorn_fixes
    from eecp.patches import wsproto as wsproto_speedups

    hypercorn_fixes.apply()
    wsproto_speedups.install()
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    cfg.keep_alive_timeout = 75
    cfg.websocket_ping_interval = 10
    cfg.websocket_max_message_size = 2 * 1024 * 1024

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "websocket":
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        async with trio.open_nursery() as nursery:
            never = trio.Event()
            for _ in range(tasks):
                nursery.start_soon(never.wait)
            while (await receive())["type"] != "websocket.disconnect":
                pass
            nursery.cancel_scope.cancel()

    await hypercorn_serve(app, cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def hold(url: str, done: trio.Event,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """One idle WebSocket until ``done``."""
    async with open_websocket_url(url):
        task_status.started()
        await done.wait()


async def measure(args: argparse.Namespace, pid: int, port: int) -> None:
    url = f"ws://127.0.0.1:{port}/v1/tunnel"
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(hold, url, done)
        await trio.sleep(args.settle)
        before = rss_kib(pid)
        for first in range(0, args.sockets, 100):  # 100 handshakes at a time
            async with trio.open_nursery() as batch:
                for _ in range(first, min(first + 100, args.sockets)):
                    batch.start_soon(nursery.start, hold, url, done)
        await trio.sleep(args.settle)
        after = rss_kib(pid)
        print(f"bare hypercorn, {args.tasks} waiting task(s) per socket: RSS {before / 1024:.1f}"
              f" MiB with 1 WebSocket, {after / 1024:.1f} MiB with {args.sockets + 1}; per"
              f" WebSocket {(after - before) / args.sockets:.1f} KiB")
        done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000, help="idle WebSockets (1000)")
    parser.add_argument("--tasks", type=int, default=0,
                        help="extra waiting tasks per socket in the app (0)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS read")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve, args.tasks)
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port),
                               "--tasks", str(args.tasks)],
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        trio.run(measure, args, server.pid, port)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()

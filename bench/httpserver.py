"""Micro-benchmark of ``eecp.dataplane.http`` against hypercorn, run by hand::

    python bench/httpserver.py [--duration 5] [--connections 64] [--threads 2]

Each server runs alone in a subprocess (one trio thread, like the real listeners) and answers
``GET /v1/resolve`` with a tiny JSON document; ``wrk`` (``apt-get install -y wrk``) loads it.
Prints requests per second for both and their ratio. Numbers depend on the machine: compare
within one run only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BODY = b'{"agent":"a1b2c3","app":"shop","network":"forge-1","sealed":true}'
HEADERS = (("content-type", "application/json"), ("cache-control", "no-store"))


def serve_eecp(port: int) -> None:
    import trio

    from eecp.dataplane.http import Request, Responder, serve_http

    async def resolve(request: Request, responder: Responder) -> None:
        await responder.respond(200, HEADERS, BODY)

    trio.run(serve_http, resolve, "127.0.0.1", port)


def serve_hypercorn(port: int) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    head = [(k.encode(), v.encode()) for k, v in HEADERS]
    head.append((b"content-length", str(len(BODY)).encode()))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": BODY})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    asgi: Any = app  # a bare ASGI callable; hypercorn's own types are stricter than needed
    trio.run(serve, asgi, config)


SERVERS = {"eecp": serve_eecp, "hypercorn": serve_hypercorn}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def measure(name: str, args: argparse.Namespace) -> float:
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, __file__, "--serve", name, "--port", str(port)],
                              cwd=root)
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/v1/resolve?host=shop.example"
        out = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}",
                              f"-d{args.duration}s", url],
                             capture_output=True, text=True, check=True).stdout
    finally:
        server.terminate()
        server.wait()
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        print(f"  {name}: {errors.group(0)}")
    if match is None:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.serve:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        SERVERS[args.serve](args.port)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    results = {name: measure(name, args) for name in ("eecp", "hypercorn")}
    for name, rate in results.items():
        print(f"{name:10} {rate:10.0f} req/s")
    print(f"ratio      {results['eecp'] / results['hypercorn']:10.1f}x")


if __name__ == "__main__":
    main()

"""The shipped front-proxy configurations, for real: nginx (``examples/nginx.conf``) and Caddy
(the top-level ``Caddyfile``), adapted only to loopback test ports, in front of a whole eecp
with our real agent forwarding to a small streaming backend (real clock: external processes).

Client ──HTTP──▶ nginx/Caddy ──auth_request/forward_auth──▶ eecp auth listener
                         └──────────────▶ eecp proxy listener ══tunnel══▶ agent ──▶ backend
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from agent.agent import build_provider
from agent.config import from_env as agent_env
from agent.tunnel import AgentState, run_agent
from eecp.dev import pki as devpki
from tests import frontproxies as fp
from tests import harness
from tests.selfsigned import make_self_signed
from tests.wsapp import MAX_MESSAGE, serve_echo_with_health

KINDS = ("nginx", "caddy")
MIB = 1024 * 1024
BIG = 50 * MIB
CLIENT_IP = "127.0.0.2"  # the client's source address, to tell it apart from the proxy's
AGENT_ID = "7d1e4c2a-3b5f-4a6e-8c9d-0e1f2a3b4c5d"


# ---------------------------------------------------------------------------------------------
# The backend: trio + h11, keep-alive, streaming request and response bodies
# ---------------------------------------------------------------------------------------------

_DOWNLOAD: bytes | None = None


def download_bytes() -> bytes:
    """50 MiB that never repeat (a reordered or dropped chunk changes the hash)."""
    global _DOWNLOAD
    if _DOWNLOAD is None:
        _DOWNLOAD = random.Random(4).randbytes(BIG)
    return _DOWNLOAD


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Backend:
    """The app behind the agent. Routes: ``/health``, ``/hello`` (echoes the request headers as
    JSON), ``POST /upload`` (SHA-256 of the body), ``/download`` (50 MiB), ``/sse`` (event 1,
    then event 2 once ``sse_release`` is set)."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    sse_first_sent: trio.Event = field(default_factory=trio.Event)
    sse_release: trio.Event = field(default_factory=trio.Event)

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.target.split("?")[0] == path]

    async def serve(self, task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(stream, conn)
                if not isinstance(event, h11.Request):
                    return
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                seen = Seen(event.method.decode(), event.target.decode(), headers)
                self.seen.append(seen)
                await self._route(stream, conn, seen)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()

    async def _route(self, stream: trio.SocketStream, conn: h11.Connection, seen: Seen) -> None:
        path = seen.target.split("?")[0]
        if path == "/upload":
            digest, size = hashlib.sha256(), 0
            while True:
                event = await _next_event(stream, conn)
                if isinstance(event, h11.Data):
                    digest.update(event.data)
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            body = json.dumps({"sha256": digest.hexdigest(), "bytes": size}).encode()
            await _respond(stream, conn, 200, [("content-type", "application/json")], body)
            return
        if not await _drain(stream, conn):
            return
        if path == "/health":
            await _respond(stream, conn, 200, [("content-type", "text/plain")], b"ok")
        elif path == "/hello":
            body = json.dumps({"hello": "shop", "headers": seen.headers}).encode()
            await _respond(stream, conn, 200, [("content-type", "application/json"),
                                               ("x-backend", "yes")], body)
        elif path == "/download":
            data = download_bytes()
            await _send(stream, conn, h11.Response(status_code=200, headers=[
                ("content-type", "application/octet-stream"),
                ("content-length", str(len(data)))]))
            for offset in range(0, len(data), 256 * 1024):
                await _send(stream, conn, h11.Data(data=data[offset:offset + 256 * 1024]))
            await _send(stream, conn, h11.EndOfMessage())
        elif path == "/sse":
            await _send(stream, conn, h11.Response(status_code=200, headers=[
                ("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                ("transfer-encoding", "chunked")]))
            await _send(stream, conn, h11.Data(data=b"id: 1\ndata: one\n\n"))
            self.sse_first_sent.set()
            await self.sse_release.wait()
            await _send(stream, conn, h11.Data(data=b"id: 2\ndata: two\n\n"))
            await _send(stream, conn, h11.EndOfMessage())
        else:
            await _respond(stream, conn, 404, [("content-type", "text/plain")], b"no such page")


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(256 * 1024))


async def _drain(stream: trio.SocketStream, conn: h11.Connection) -> bool:
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.EndOfMessage):
            return True
        if not isinstance(event, h11.Data):
            return False


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _respond(stream: trio.SocketStream, conn: h11.Connection, status: int,
                   headers: list[tuple[str, str]], body: bytes) -> None:
    await _send(stream, conn, h11.Response(status_code=status, headers=[
        *headers, ("content-length", str(len(body)))]))
    await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


# ---------------------------------------------------------------------------------------------
# The world: eecp + our agent + the backend + one front proxy
# ---------------------------------------------------------------------------------------------

@dataclass
class World:
    cp: harness.ControlPlane
    proxy: fp.FrontProxy
    backend: Backend
    agent: AgentState
    pki: devpki.DevPki

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """A client whose connections come from 127.0.0.2 (so X-Forwarded-For can be told
        apart from the front proxy's own 127.0.0.1)."""
        transport = httpx.AsyncHTTPTransport(local_address=CLIENT_IP)
        return httpx.AsyncClient(base_url=self.proxy.url, transport=transport,
                                 timeout=httpx.Timeout(30.0), **kwargs)  # type: ignore[arg-type]


def app_host(app: str) -> dict[str, str]:
    return {"Host": f"{app}.{fp.APP_DOMAIN}"}


def require(kind: str) -> None:
    binary = fp.nginx_binary() if kind == "nginx" else fp.caddy_binary()
    if binary is None:
        pytest.skip(f"{kind} is not installed (not on PATH, nor in /usr/sbin, /usr/bin)")


async def wait_resolve(cp: harness.ControlPlane, app: str, status: int) -> dict[str, object]:
    with trio.fail_after(20):
        while True:
            response = await cp.resolve(app)
            if response.status_code == status:
                return dict(response.json())
            await trio.sleep(0.02)


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=41)


@pytest.fixture(params=KINDS)
async def world(request: pytest.FixtureRequest, tmp_path: Path, pki: devpki.DevPki
                ) -> AsyncIterator[World]:
    kind: str = request.param
    require(kind)
    async with trio.open_nursery() as nursery:
        backend: Backend = await nursery.start(Backend().serve)
        try:
            async with open_world(kind, tmp_path, pki, backend.url) as (cp, proxy, agent):
                yield World(cp, proxy, backend, agent, pki)
        finally:
            backend.sse_release.set()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_world(kind: str, tmp_path: Path, pki: devpki.DevPki, backend_url: str
                     ) -> AsyncIterator[tuple[harness.ControlPlane, fp.FrontProxy, AgentState]]:
    """eecp, our real agent forwarding to ``backend_url``, and the front proxy ``kind``."""
    root = devpki.save_pki(pki, tmp_path / "pki")
    async with harness.open_upstreams(pki) as (pccs, github), trio.open_nursery() as nursery:
        env = harness.control_plane_env(tmp_path, pki, pccs.url, github.url,
                                        EE_DCAP_ROOT_CA=str(root), EE_PROXY_TIMEOUT_SEC="15")
        async with harness.open_control_plane(env, pki, pccs, github) as cp:
            stop = trio.Event()
            config = agent_env({
                "EE_CONTROL_WS": cp.ws_url, "EE_REPO": harness.REPO,
                "EE_RELEASE_TAG": harness.TAG, "EE_APP_NAME": "shop", "EE_NETWORK": "forge-1",
                "EE_BACKEND_URL": backend_url, "EE_AGENT_ID": AGENT_ID,
                "EE_QUOTE_PROVIDER": "dev", "EE_DEV_PKI_DIR": str(tmp_path / "pki"),
                "EE_RECONNECT_MIN_SEC": "0.05", "EE_RECONNECT_MAX_SEC": "0.2",
                "EE_TUNNEL_PING_INTERVAL_SEC": "0"})
            agent: AgentState = await nursery.start(partial(
                run_agent, config, build_provider(config), harness.MEAS, stop=stop))
            await wait_resolve(cp, "shop", 200)
            ports = fp.EecpPorts(cp.bound.control_port, cp.bound.auth_port, cp.bound.proxy_port)
            try:
                async with fp.open_front_proxy(kind, tmp_path / kind, ports) as proxy:
                    yield cp, proxy, agent
            finally:
                stop.set()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# The example files themselves
# ---------------------------------------------------------------------------------------------

def test_shipped_caddyfile_adapts() -> None:
    require("caddy")
    binary = fp.caddy_binary()
    assert binary is not None
    result = subprocess.run([binary, "adapt", "--config", str(fp.CADDYFILE), "--adapter",
                             "caddyfile"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    text = json.dumps(config)
    assert '"*.app.example.com"' in text and '"control.example.com"' in text
    assert '"uri": "/v1/resolve"' in text and '"127.0.0.1:8089"' in text
    assert '"127.0.0.1:9090"' in text and '"127.0.0.1:8088"' in text
    assert '"flush_interval": -1' in text
    assert "{http.request.host.labels.3}" in text  # X-EE-App from the site's first label


def test_shipped_nginx_conf_passes_nginx_t_with_tls(tmp_path: Path) -> None:
    """The example as shipped (TLS and all) is valid; only certificate and cache paths move."""
    require("nginx")
    binary = fp.nginx_binary()
    assert binary is not None
    cert, key = make_self_signed(tmp_path, "*.app.example.com")
    text = fp.NGINX_EXAMPLE.read_text()
    for site in ("app.example.com", "control.example.com"):
        text = text.replace(f"/etc/ssl/eecp/{site}/fullchain.pem", str(cert))
        text = text.replace(f"/etc/ssl/eecp/{site}/privkey.pem", str(key))
    assert "/etc/ssl/eecp" not in text
    text = text.replace("/var/cache/nginx/eecp_auth", str(tmp_path / "cache"))
    site_file = tmp_path / "eecp.conf"
    site_file.write_text(text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(fp.nginx_wrapper(tmp_path, site_file))
    result = subprocess.run([binary, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                             "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    # TLS, streaming and the micro-cache are really in the shipped file
    for needle in ("listen 443 ssl", "auth_request /_eecp_auth;", "proxy_buffering off;",
                   "proxy_request_buffering off;", "client_max_body_size 0;",
                   "proxy_cache_valid 200 403 1s;", "proxy_set_header X-EE-App $app;",
                   'proxy_set_header Connection "";', "keepalive 64;"):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------------
# Through the front proxy
# ---------------------------------------------------------------------------------------------

async def test_allowed_app_reaches_the_backend(world: World) -> None:
    async with world.client() as client:
        with trio.fail_after(30):
            # a client-sent X-EE-App must not pick another app: the proxy overrides it
            response = await client.get("/hello?x=1", headers={
                **app_host("shop"), "X-EE-App": "nosuch", "X-Forwarded-For": "6.6.6.6"})
            # the app's own error pages pass through untouched
            missing = await client.get("/nope", headers=app_host("shop"))
    assert (missing.status_code, missing.content) == (404, b"no such page")
    assert response.status_code == 200, (response.text, world.proxy.log())
    assert response.headers["x-backend"] == "yes"
    body = response.json()
    assert body["hello"] == "shop"
    seen = world.backend.requests_to("/hello")
    assert len(seen) == 1 and seen[0].target == "/hello?x=1" and seen[0].method == "GET"
    headers = seen[0].headers
    assert headers == body["headers"]
    # the client's address first (the front proxy's view), a spoofed one dropped
    chain = [part.strip() for part in headers["x-forwarded-for"].split(",")]
    assert chain[0] == CLIENT_IP, headers
    assert "6.6.6.6" not in chain, headers
    assert headers["x-forwarded-proto"] == "http"
    assert f"shop.{fp.APP_DOMAIN}" in (headers.get("host"), headers.get("x-forwarded-host")), \
        headers
    assert headers.get("x-ee-release-tag") == harness.TAG, headers  # handed on by the auth step


async def test_refused_and_unknown_apps_get_403(world: World) -> None:
    # "gone": registered and attested, then its agent leaves (not_connected)
    gone = harness.FakeAgent(world.cp.ws_url, world.pki, app="gone")
    async with harness.running_agent(gone):
        await gone.wait_status("attested")
    await wait_resolve(world.cp, "gone", 403)
    async with world.client() as client:
        with trio.fail_after(30):
            answers = {app: await client.get("/hello", headers=app_host(app))
                       for app in ("gone", "nosuch", "shop")}
            # methods with bodies are judged the same way (the auth step is always a GET)
            posted = await client.post("/upload", headers=app_host("nosuch"), content=b"x" * 10)
            # the app is the Host's: headers naming another (allowed) app change nothing
            spoofed = await client.get("/hello", headers={
                **app_host("gone"), "X-Original-Host": f"shop.{fp.APP_DOMAIN}",
                "X-Forwarded-Host": f"shop.{fp.APP_DOMAIN}", "X-EE-App": "shop"})
            unmatched = None
            if world.proxy.kind == "nginx":
                unmatched = await client.get("/", headers={"Host": "a.b.app.example.com"})
            metrics = (await world.cp.get("/metrics")).text
    answers["spoofed"] = spoofed
    for app, reason in (("gone", "not_connected"), ("nosuch", "unknown_app"),
                        ("spoofed", "not_connected")):
        response = answers[app]
        assert response.status_code == 403, (app, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["allowed"] is False and body["reason"] == reason, body
    assert posted.status_code == 403 and posted.json()["reason"] == "unknown_app"
    assert answers["shop"].status_code == 200
    if world.proxy.kind == "nginx":  # a name no server matches: nginx's default, refused
        assert unmatched is not None and unmatched.status_code == 403, unmatched
        assert unmatched.json()["reason"] == "unknown_app"
    # refusals are the front proxy's auth step: not one reached eecp's proxy listener
    proxied = [line for line in metrics.splitlines()
               if line.startswith("eecp_proxy_requests_total{")]
    assert proxied and all('app="shop"' in line for line in proxied), proxied
    assert [s.target for s in world.backend.seen if s.target != "/health"] == ["/hello"]


@pytest.mark.parametrize("kind", KINDS)
async def test_auth_listener_down_fails_closed(kind: str, tmp_path: Path) -> None:
    """No eecp at all: the front proxy refuses (nginx: 503 auth_unavailable), never serves."""
    require(kind)
    ports = fp.EecpPorts(fp.free_port(), fp.free_port(), fp.free_port())  # nobody listens
    async with fp.open_front_proxy(kind, tmp_path / kind, ports) as proxy:
        transport = httpx.AsyncHTTPTransport(local_address=CLIENT_IP)
        async with httpx.AsyncClient(base_url=proxy.url, transport=transport) as client:
            with trio.fail_after(30):
                response = await client.get("/hello", headers=app_host("shop"))
    if kind == "nginx":
        assert response.status_code == 503, response.text
        assert response.json() == {"allowed": False, "reason": "auth_unavailable", "app": "shop"}
    else:  # Caddy: its forward_auth upstream is unreachable
        assert response.status_code == 502, response.text


@pytest.mark.parametrize("world", ["nginx"], indirect=True)
async def test_nginx_micro_caches_auth_decisions(world: World) -> None:
    """Back-to-back requests reuse the auth decision (the example's 1-second cache); a cached
    refusal still names its reason, a cached approval still hands on the release tag."""
    async with world.client() as client:
        with trio.fail_after(30):
            refused = [await client.get("/", headers=app_host("nosuch")) for _ in range(4)]
            allowed = [await client.get("/hello", headers=app_host("shop")) for _ in range(4)]
    for response in refused:
        assert response.status_code == 403 and response.json()["reason"] == "unknown_app"
    for response in allowed:
        assert response.status_code == 200
        assert response.json()["headers"]["x-ee-release-tag"] == harness.TAG
    access_log = world.proxy.workdir / "access.log"
    with trio.fail_after(10):  # a request is logged just after its answer leaves
        while True:
            lines = (await trio.Path(access_log).read_text()).splitlines()
            auth = [line.split()[2].strip('"') for line in lines if line.startswith("/_eecp_auth ")]
            if len(auth) == 8:
                break
            await trio.sleep(0.02)
    # within the 1-second validity: typically 1 MISS + 3 HITs per app (2 MISSes if a second
    # boundary falls in between)
    assert auth[:4].count("HIT") >= 2 and auth[4:].count("HIT") >= 2, auth


async def test_sse_arrives_event_by_event(world: World) -> None:
    async with world.client() as client:
        with trio.fail_after(30):
            async with client.stream("GET", "/sse", headers={
                    **app_host("shop"), "Accept": "text/event-stream"}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                received = b""
                chunks = response.aiter_raw()
                while b"\n\n" not in received:
                    # event 2 is not even written until we have event 1: no buffering anywhere
                    received += await chunks.__anext__()
                assert received == b"id: 1\ndata: one\n\n"
                assert not world.backend.sse_release.is_set()
                world.backend.sse_release.set()
                async for chunk in chunks:
                    received += chunk
    assert received == b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n"


async def test_50_mib_upload_and_download_intact(world: World) -> None:
    data = download_bytes()
    expected = hashlib.sha256(data).hexdigest()
    async with world.client() as client:
        with trio.fail_after(120):
            started = time.perf_counter()
            response = await client.post("/upload", headers=app_host("shop"), content=data)
            upload_sec = time.perf_counter() - started
            assert response.status_code == 200, response.text
            assert response.json() == {"sha256": expected, "bytes": BIG}

            started = time.perf_counter()
            digest, size = hashlib.sha256(), 0
            async with client.stream("GET", "/download", headers=app_host("shop")) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    size += len(chunk)
            download_sec = time.perf_counter() - started
            assert (size, digest.hexdigest()) == (BIG, expected)

            # a chunked upload (no Content-Length) streams through as well
            async def pieces() -> AsyncIterator[bytes]:
                for offset in range(0, 8 * MIB, MIB):
                    yield data[offset:offset + MIB]
            response = await client.post("/upload", headers=app_host("shop"), content=pieces())
            assert response.status_code == 200, response.text
            assert response.json() == {"sha256": hashlib.sha256(data[:8 * MIB]).hexdigest(),
                                       "bytes": 8 * MIB}
    print(f"\n{world.proxy.kind}: 50 MiB upload {upload_sec:.2f}s "
          f"({BIG / MIB / upload_sec:.0f} MiB/s), download {download_sec:.2f}s "
          f"({BIG / MIB / download_sec:.0f} MiB/s)")


async def test_agent_tunnel_through_the_control_host(world: World) -> None:
    """An agent dialling wss://control.example.com/v1/tunnel through the front proxy: the
    WebSocket upgrade passes and the agent is attested."""
    agent = harness.FakeAgent("", world.pki, app="viaproxy")
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", world.proxy.port)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, fp.CONTROL_HOST, "/v1/tunnel")
            await ws.send_message(agent.register_message())
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "attest_request":
                    await ws.send_message(agent.answer(bytes.fromhex(message["nonce"])))
                elif message["type"] == "status":
                    assert (message["state"], message["reason"]) == ("ok", "attested"), message
                    break
            assert (await world.cp.resolve("viaproxy")).status_code == 200
            async with world.client() as client:
                health = await client.get("/health", headers={"Host": fp.CONTROL_HOST})
            assert health.status_code == 200 and health.json()["status"] == "ok"
            await ws.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", KINDS)
async def test_websocket_apps_through_the_front_proxy(kind: str, tmp_path: Path,
                                                     pki: devpki.DevPki) -> None:
    """The shipped configuration carries the upgrade: an echo WebSocket app behind the agent
    answers text and a 1 MiB binary message, and its close code reaches the client."""
    require(kind)
    big = random.Random(5).randbytes(MIB)
    async with trio.open_nursery() as nursery:
        app_url: str = await nursery.start(serve_echo_with_health)
        async with open_world(kind, tmp_path, pki, app_url) as (_, proxy, _):
            with trio.fail_after(30):
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                async with trio.open_nursery() as inner:
                    ws = await wrap_client_stream(inner, stream, f"shop.{fp.APP_DOMAIN}",
                                                  "/headers", max_message_size=MAX_MESSAGE)
                    headers = json.loads(await ws.get_message())
                    assert headers["upgrade"].lower() == "websocket", headers
                    await ws.send_message("hello")
                    assert await ws.get_message() == "hello"
                    await ws.send_message(big)
                    assert await ws.get_message() == big
                    await ws.send_message("close:4002:app says bye")
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 4002, proxy.log()
                    assert closed.value.reason.reason == "app says bye"
                    inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()

"""Requests over the tunnel: the proxy listener, the auth listener and ``POST /v1/proxy/{app}``,
against fake agents that forward to real local backends (real sockets, MockClock)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from trio.testing import MockClock

from tests import quotefactory as qf
from tests.fakehttp import FakeServer, Request, Response, open_fake_http
from tests.harness import (
    ControlPlane,
    FakeAgent,
    control_plane_env,
    eventually,
    open_control_plane,
    open_upstreams,
    resolve_until,
    running_agent,
)


@dataclass
class Backend:
    """A scriptable app: its name is in every answer so tests can tell agents apart."""

    name: str
    server: FakeServer | None = None
    release: trio.Event = field(default_factory=trio.Event)
    entered: trio.Event = field(default_factory=trio.Event)
    events: list[trio.Event] = field(default_factory=lambda: [trio.Event() for _ in range(3)])

    async def handle(self, request: Request) -> Response:
        if request.path == "/hello":
            return Response(200, f"hello from {self.name}".encode(),
                            [("x-backend", self.name), ("connection", "keep-alive")])
        if request.path == "/echo":
            return Response(201, request.body, [("x-method", request.method)])
        if request.path == "/headers":
            return Response.json(json.dumps(request.headers))
        if request.path == "/cookies":
            return Response(200, b"", [("set-cookie", "a=1"), ("set-cookie", "b=2"),
                                       ("set-cookie", "c=3")])
        if request.path == "/hang":
            self.entered.set()
            await self.release.wait()
            return Response(200, b"late")
        if request.path == "/cut":  # a head, part of the body, then the connection drops
            return Response(200, headers=[("content-type", "text/plain")], chunks=self._cut())
        if request.path == "/sse":
            return Response(200, headers=[("content-type", "text/event-stream")],
                            chunks=self._events())
        return Response(404, b"nope")

    async def _cut(self) -> AsyncIterator[bytes]:
        yield b"partial"
        raise trio.BrokenResourceError

    async def _events(self) -> AsyncIterator[bytes]:
        for index, gate in enumerate(self.events):
            await gate.wait()
            yield f"data: event {index}\n\n".encode()


@dataclass
class World:
    cp: ControlPlane
    pki: qf.TestPki
    clock: MockClock

    def agent(self, backend: FakeServer, **kwargs: object) -> FakeAgent:
        return FakeAgent(self.cp.ws_url, self.pki, backend_url=backend.url,  # type: ignore[arg-type]
                         **kwargs)


@asynccontextmanager
async def open_backend(name: str) -> AsyncIterator[tuple[Backend, FakeServer]]:
    backend = Backend(name)
    async with open_fake_http(backend.handle) as server:
        backend.server = server
        yield backend, server


@pytest.fixture(scope="session")
def pki() -> qf.TestPki:
    return qf.make_pki(seed=31)


@asynccontextmanager
async def open_world(tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock,
                     **extra: str) -> AsyncIterator[World]:
    assert trio.lowlevel.current_clock() is mock_clock, "request mock_clock in the test"
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url, **extra)
        async with open_control_plane(env, pki, pccs, github) as cp:
            yield World(cp, pki, mock_clock)


@pytest.fixture
async def world(tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock) -> AsyncIterator[World]:
    async with open_world(tmp_path, pki, mock_clock) as world:
        yield world


async def proxy_get(cp: ControlPlane, path: str, host: str = "shop.app.example.com",
                    headers: dict[str, str] | None = None) -> httpx.Response:
    # no client timeout: the mock clock jumps, and the server's timeouts are under test
    async with httpx.AsyncClient(timeout=None) as client:
        return await client.get(cp.proxy_url + path, headers=headers or {"Host": host})


async def test_requests_reach_the_app(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        response = await proxy_get(world.cp, "/hello?x=1")
        assert (response.status_code, response.text) == (200, "hello from one")
        assert response.headers["x-backend"] == "one"
        assert "keep-alive" not in response.headers.get("connection", "")
        async with httpx.AsyncClient() as client:
            echoed = await client.post(world.cp.proxy_url + "/echo", content=b"x" * 300_000,
                                       headers={"X-EE-App": "shop", "Host": "elsewhere"})
        assert (echoed.status_code, len(echoed.content)) == (201, 300_000)
        assert echoed.headers["x-method"] == "POST"
        seen = (await proxy_get(world.cp, "/headers",
                                headers={"Host": "shop.app.example.com",
                                         "X-Forwarded-For": "6.6.6.6",
                                         "Connection": "keep-alive, x-secret",
                                         "X-Secret": "hop", "Proxy-Authorization": "p"})).json()
        assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "shop.app.example.com"
        assert "x-secret" not in seen and "proxy-authorization" not in seen
        cookies = await proxy_get(world.cp, "/cookies")
        assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]



SPOOFED = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
           "X-Forwarded-Host": "bank.example"}
#: what apps also read as a proxy's word, and eecp's own decision headers
ALSO_SPOOFED = {"X-Real-IP": "6.6.6.6", "X_Forwarded_For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
                "X-EE-Release-Tag": "forged"}


@pytest.mark.parametrize("trusted", ["10.0.0.0/8", "none"])
async def test_forwarded_headers_from_an_untrusted_client_are_replaced(
        tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock, trusted: str) -> None:
    # this client (127.0.0.1) is not a trusted proxy here: what it claims must not reach the app
    async with open_world(tmp_path, pki, mock_clock, EE_TRUSTED_PROXIES=trusted) as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        seen = (await proxy_get(world.cp, "/headers", headers={
            "Host": "shop.app.example.com", "X-EE-App": "shop", **SPOOFED, **ALSO_SPOOFED})).json()
        assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert seen["x-forwarded-host"] == "shop.app.example.com"
        assert not {name.lower() for name in ALSO_SPOOFED} & set(seen), seen
        # nor does its X-Forwarded-Host (bank.example) name the app: Host does
        named = await proxy_get(world.cp, "/hello", headers={"Host": "shop.app.example.com",
                                                             **SPOOFED})
        assert (named.status_code, named.text) == (200, "hello from one")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", headers=SPOOFED, json={
                "path": "/headers",
                "headers": {**SPOOFED, **ALSO_SPOOFED, "Host": "shop.internal"}})
        assert answer.status_code == 200, answer.text
        seen = json.loads(base64.b64decode(answer.json()["body_b64"]))
        assert not {name.lower() for name in ALSO_SPOOFED} & set(seen), seen
        assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
        assert seen["x-forwarded-host"] == "shop.internal"


async def test_the_json_proxy_believes_a_trusted_front_proxy_only(
        mock_clock: MockClock, world: World) -> None:
    # loopback is trusted by default: the HTTP request's X-Forwarded-* (what Caddy set) count,
    # the JSON's own never do
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", headers={
                "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "eecp.example.com"}, json={
                "path": "/headers", "headers": {**SPOOFED, "Host": "shop.internal"}})
        assert answer.status_code == 200, answer.text
        seen = json.loads(base64.b64decode(answer.json()["body_b64"]))
        assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-host"] == "shop.internal"
        # on the proxy listener, the host a trusted proxy was asked for names the app
        named = await proxy_get(world.cp, "/hello", headers={
            "Host": "eecp-proxy.internal", "X-Forwarded-Host": "shop.app.example.com"})
        assert (named.status_code, named.text) == (200, "hello from one")

async def test_refusals_mirror_resolve(mock_clock: MockClock, world: World) -> None:
    response = await proxy_get(world.cp, "/hello", host="nosuch.app.example.com")
    assert response.status_code == 403
    assert response.json() == {"allowed": False, "reason": "unknown_app"}
    async with httpx.AsyncClient() as client:
        missing = await client.get(world.cp.proxy_url + "/hello", headers={"Host": ""})
    assert (missing.status_code, missing.json()["reason"]) == (400, "missing_app")
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        await agent.health("fail")
        await agent.wait_status("health_fail")
        sick = await proxy_get(world.cp, "/hello")
        assert (sick.status_code, sick.json()["reason"]) == (403, "health_fail")


async def test_backend_down_is_agent_error(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server):
        down = FakeServer(url=server.url)
    agent = FakeAgent(world.cp.ws_url, world.pki, backend_url=down.url)  # nothing listens
    async with running_agent(agent):
        await agent.wait_status("attested")
        response = await proxy_get(world.cp, "/hello")
        assert response.status_code == 502
        # the app may be served: it is this request that failed (alike on both entry points)
        assert response.json() == {"allowed": True, "reason": "agent_error"}
        async with httpx.AsyncClient() as client:
            api = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/hello"})
        assert (api.status_code, api.json()) == (502, {"allowed": True, "reason": "agent_error"})


async def test_an_app_whose_agents_left_is_not_connected_on_both_entry_points(
        mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server):
        async with running_agent(world.agent(server)) as agent:
            await agent.wait_status("attested")
            assert (await proxy_get(world.cp, "/hello")).status_code == 200
        body = await resolve_until(world.cp, "shop", lambda b: b["agents"] == 0)
        assert (body["allowed"], body["reason"]) == (False, "not_connected")
        response = await proxy_get(world.cp, "/hello")
        assert (response.status_code, response.json()) == (
            403, {"allowed": False, "reason": "not_connected"})
        async with httpx.AsyncClient() as client:
            api = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/hello"})
        assert (api.status_code, api.json()) == (
            403, {"allowed": False, "reason": "not_connected"})
        assert [r.path for r in server.requests] == ["/hello"]


async def test_upstream_timeout_on_both_entry_points(tmp_path: Path, pki: qf.TestPki,
                                                    mock_clock: MockClock) -> None:
    # shorter than the agent's own backend timeout (30 s here): eecp's is what answers
    patience = 5
    extra = {"EE_PROXY_TIMEOUT_SEC": str(patience)}
    async with open_world(tmp_path, pki, mock_clock, **extra) as world, \
            open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        result: list[httpx.Response] = []

        async def call() -> None:
            result.append(await proxy_get(world.cp, "/hang"))

        async def call_api() -> None:
            async with httpx.AsyncClient(timeout=None) as client:
                result.append(await client.post(world.cp.url + "/v1/proxy/shop",
                                                json={"path": "/hang"}))
        for start in (call, call_api):  # the proxy listener, then the control port's JSON proxy
            result.clear()
            backend.entered = trio.Event()
            nursery.start_soon(start)
            await backend.entered.wait()
            world.clock.jump(patience - 0.5)
            await trio.to_thread.run_sync(__import__("time").sleep, 0.2)
            assert result == []  # half a second short: still waiting for the app
            world.clock.jump(1)
            await eventually(lambda: bool(result))
            assert (result[0].status_code, result[0].json()) == (
                504, {"allowed": True, "reason": "upstream_timeout"})
        backend.release.set()


async def test_a_slow_upload_that_keeps_moving_is_no_upstream_timeout(mock_clock: MockClock,
                                                                     world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(4):  # 80 s in all, more than EE_PROXY_TIMEOUT_SEC (60)
                yield b"u" * 1000
                await trio.to_thread.run_sync(__import__("time").sleep, 0.05)  # it leaves
                world.clock.jump(20)

        async with httpx.AsyncClient(timeout=None) as client:
            response = await client.post(world.cp.proxy_url + "/echo", content=upload(),
                                         headers={"Host": "shop.app.example.com"})
        assert (response.status_code, response.content) == (201, b"u" * 4000)


@pytest.mark.parametrize("entry", ["proxy listener", "POST /v1/proxy"])
async def test_tunnel_loss_fails_requests_in_flight(mock_clock: MockClock, world: World,
                                                   entry: str) -> None:
    async with open_backend("one") as (backend, server), trio.open_nursery() as nursery:
        result: list[httpx.Response] = []
        async with running_agent(world.agent(server)) as agent:
            await agent.wait_status("attested")

            async def call() -> None:
                if entry == "proxy listener":
                    result.append(await proxy_get(world.cp, "/hang"))
                    return
                async with httpx.AsyncClient(timeout=None) as client:
                    result.append(await client.post(world.cp.url + "/v1/proxy/shop",
                                                    json={"path": "/hang"}))
            nursery.start_soon(call)
            await backend.entered.wait()
        # the agent's tunnel is gone while the request waits for its answer
        await eventually(lambda: bool(result))
        assert (result[0].status_code, result[0].json()) == (
            502, {"allowed": True, "reason": "tunnel_closed"})
        backend.release.set()


async def test_server_sent_events_stream_through(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client, client.stream(
                "GET", world.cp.proxy_url + "/sse",
                headers={"Host": "shop.app.example.com"}) as response:
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.aiter_raw()
            for index, gate in enumerate(backend.events):
                gate.set()  # the backend sends event N only now
                assert await chunks.__anext__() == f"data: event {index}\n\n".encode()


async def test_least_loaded_agent_and_retry(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (b_one, one), open_backend("two") as (b_two, two), \
            trio.open_nursery() as nursery, running_agent(world.agent(one)) as first, \
                running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        held: list[httpx.Response] = []

        async def hold() -> None:
            held.append(await proxy_get(world.cp, "/hang"))
        nursery.start_soon(hold)
        # with both idle either agent may take the first request; the other is then less loaded
        await eventually(lambda: b_one.entered.is_set() or b_two.entered.is_set())
        busy, idle = (b_one, b_two) if b_one.entered.is_set() else (b_two, b_one)
        for _ in range(3):
            assert (await proxy_get(world.cp, "/hello")).text == f"hello from {idle.name}"
        busy.release.set()


async def test_idempotent_request_retried_on_another_agent(mock_clock: MockClock,
                                                           world: World) -> None:
    async def drop(request: Request) -> Response:
        raise trio.BrokenResourceError  # the connection closes without an answer

    async with open_backend("two") as (good, two), open_fake_http(drop) as broken, \
            trio.open_nursery() as nursery:
        dead = FakeAgent(world.cp.ws_url, world.pki, backend_url=broken.url)
        async with running_agent(dead), running_agent(world.agent(two)) as alive:
            await dead.wait_status("attested")
            await alive.wait_status("attested")

            async def hold() -> None:
                await proxy_get(world.cp, "/hang")
            nursery.start_soon(hold)
            # whichever agent it tried first, the held request ends up on the good one (a GET
            # is retried): the dead agent is now the least loaded and is picked first
            await good.entered.wait()
            tried = len(broken.requests)
            for _ in range(3):
                response = await proxy_get(world.cp, "/hello")
                assert (response.status_code, response.text) == (200, "hello from two")
            assert len(broken.requests) == tried + 3  # each GET failed there, then was retried
            async with httpx.AsyncClient() as client:
                post = await client.post(world.cp.proxy_url + "/echo", content=b"x",
                                         headers={"Host": "shop.app.example.com"})
            # a request with a body is never replayed
            assert (post.status_code, post.json()["reason"]) == (502, "agent_error")
            assert len(broken.requests) == tried + 4
            good.release.set()


async def _drop(request: Request) -> Response:
    raise trio.BrokenResourceError  # the connection closes without an answer


async def test_a_request_is_tried_on_two_agents_at_most(mock_clock: MockClock,
                                                        world: World) -> None:
    async with open_backend("good") as (good, server), open_fake_http(_drop) as broken_1, \
            open_fake_http(_drop) as broken_2, trio.open_nursery() as nursery:
        dead = [FakeAgent(world.cp.ws_url, world.pki, backend_url=b.url)
                for b in (broken_1, broken_2)]
        async with running_agent(world.agent(server)) as alive:
            await alive.wait_status("attested")
            nursery.start_soon(proxy_get, world.cp, "/hang")
            await good.entered.wait()  # the good agent is now the most loaded: picked last
            async with running_agent(dead[0]), running_agent(dead[1]):
                for agent in dead:
                    await agent.wait_status("attested")

                def tries() -> int:
                    return len(broken_1.requests) + len(broken_2.requests)
                response = await proxy_get(world.cp, "/hello")
                assert (response.status_code, response.json()["reason"]) == (502, "agent_error")
                # tried on both dead agents (a retry), never on the third: once, not on every agent
                # (an agent may itself send a GET twice to its backend: counts are not compared)
                assert broken_1.requests and broken_2.requests
                before = tries()
                async with httpx.AsyncClient() as client:
                    post = await client.post(world.cp.proxy_url + "/hello",
                                             headers={"Host": "shop.app.example.com"})
                # no body, but POST is not idempotent: never replayed
                assert (post.status_code, post.json()["reason"]) == (502, "agent_error")
                assert tries() == before + 1
                assert [r.path for r in server.requests] == ["/hang"]
                good.release.set()


async def test_a_request_whose_answer_has_begun_is_not_retried(mock_clock: MockClock,
                                                               world: World) -> None:
    async with open_backend("one") as (b_one, one), open_backend("two") as (b_two, two), \
            trio.open_nursery() as nursery, running_agent(world.agent(one)) as first, \
            running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        nursery.start_soon(proxy_get, world.cp, "/hang")
        await eventually(lambda: b_one.entered.is_set() or b_two.entered.is_set())
        busy, idle = (one, two) if b_one.entered.is_set() else (two, one)
        # the idle agent's backend sends a head and part of the body, then drops: the client
        # already has the head, so the request cannot be replayed elsewhere
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(world.cp.proxy_url + "/cut",
                                 headers={"Host": "shop.app.example.com"})
        assert [r.path for r in idle.requests] == ["/cut"]
        assert [r.path for r in busy.requests] == ["/hang"]
        b_one.release.set()
        b_two.release.set()


async def test_an_agent_failing_reattestation_is_drained_from_the_pick(
        mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, one), open_backend("two") as (_, two), \
            running_agent(world.agent(one)) as first, running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        # idle agents tie: the pick is the same one each time; that one's node changes
        preferred = (await proxy_get(world.cp, "/hello")).text
        failing, staying = (first, second) if preferred == "hello from one" else (second, first)
        failing.mint_kwargs = {"rtmrs": (*qf.DEFAULT_RTMRS[:3], b"\x09" * 48)}
        world.clock.jump(3600)
        assert await failing.wait_closed() == (4003, "quote_measurement_mismatch:rtmr3")
        await staying.wait_for(lambda a: a.statuses().count(("ok", "attested")) == 2)
        await staying.health()
        await resolve_until(world.cp, "shop", lambda b: b["allowed"] and b["agents"] == 1)
        answers = {(await proxy_get(world.cp, "/hello")).text for _ in range(4)}
        assert answers == {"hello from one", "hello from two"} - {preferred}


async def test_an_agent_failing_health_is_drained_from_the_pick(mock_clock: MockClock,
                                                                world: World) -> None:
    async with open_backend("one") as (_, one), open_backend("two") as (_, two), \
            running_agent(world.agent(one)) as first, running_agent(world.agent(two)) as second:
        await first.wait_status("attested")
        await second.wait_status("attested")
        for sick, well in ((first, "two"), (second, "one")):
            await sick.health("fail")
            await sick.wait_status("health_fail")
            answers = {(await proxy_get(world.cp, "/hello")).text for _ in range(4)}
            assert answers == {f"hello from {well}"}
            await sick.health("pass")
            await eventually(lambda agent=sick: agent.statuses()[-1][0] == "ok")


async def test_control_messages_flow_while_a_stream_is_open(mock_clock: MockClock,
                                                            world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client, client.stream(
                "GET", world.cp.proxy_url + "/sse",
                headers={"Host": "shop.app.example.com"}) as response:
            chunks = response.aiter_raw()
            backend.events[0].set()
            assert await chunks.__anext__() == b"data: event 0\n\n"
            # the tunnel carries the stream's frames and the agent's JSON messages side by side
            await agent.health("fail")
            await agent.wait_status("health_fail")
            assert (await world.cp.resolve("shop")).status_code == 403
            await agent.health("pass")
            await eventually(lambda: agent.statuses()[-1][0] == "ok")
            assert (await world.cp.resolve("shop")).status_code == 200
            for index in (1, 2):
                backend.events[index].set()
                assert await chunks.__anext__() == f"data: event {index}\n\n".encode()


async def test_a_request_waits_briefly_for_a_stream_slot_then_is_agent_busy(
        tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_TUNNEL_MAX_STREAMS="1") as world, \
            open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        results: dict[str, httpx.Response] = {}

        async def call(path: str) -> None:
            results[path] = await proxy_get(world.cp, path)

        async def wait_behind_hang(seconds: float) -> None:
            backend.entered, backend.release = trio.Event(), trio.Event()
            nursery.start_soon(call, "/hang")
            await backend.entered.wait()  # the one slot is taken
            nursery.start_soon(call, "/hello")
            await trio.to_thread.run_sync(__import__("time").sleep, 0.2)
            world.clock.jump(seconds)
            await trio.to_thread.run_sync(__import__("time").sleep, 0.1)

        await wait_behind_hang(1)  # within the 2 s a request may wait for a slot
        assert results == {}
        backend.release.set()  # the slot frees: the waiting request takes it
        await eventually(lambda: len(results) == 2)
        assert (results["/hang"].status_code, results["/hang"].text) == (200, "late")
        assert (results["/hello"].status_code, results["/hello"].text) == (200, "hello from one")
        results.clear()
        await wait_behind_hang(2.5)  # longer: it gives up
        await eventually(lambda: "/hello" in results)
        assert (results["/hello"].status_code, results["/hello"].json()) == (
            503, {"allowed": True, "reason": "agent_busy"})
        backend.release.set()


async def test_a_body_over_the_configured_limit_is_refused(
        tmp_path: Path, pki: qf.TestPki, mock_clock: MockClock) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_PROXY_MAX_BODY_BYTES="1000") as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent, \
            httpx.AsyncClient() as client:
        await agent.wait_status("attested")
        headers = {"Host": "shop.app.example.com"}
        small = await client.post(world.cp.proxy_url + "/echo", content=b"s" * 1000,
                                  headers=headers)
        assert (small.status_code, small.content) == (201, b"s" * 1000)
        large = await client.post(world.cp.proxy_url + "/echo", content=b"l" * 1001,
                                  headers=headers)
        assert large.status_code == 413


async def test_json_proxy_on_the_control_port(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            answer = await client.post(world.cp.url + "/v1/proxy/shop", json={
                "method": "POST", "path": "/echo", "headers": {"x-a": "1"},
                "body_b64": base64.b64encode(b"ping").decode()})
            assert answer.status_code == 200
            doc = answer.json()
            assert doc["status"] == 201 and base64.b64decode(doc["body_b64"]) == b"ping"
            assert ["x-method", "POST"] in doc["headers"]
            bad = await client.post(world.cp.url + "/v1/proxy/shop",
                                    json={"path": "http://evil/"})
            assert (bad.status_code, bad.json()["reason"]) == (400, "invalid_field:path")
            unknown = await client.post(world.cp.url + "/v1/proxy/nosuch", json={"path": "/"})
            assert (unknown.status_code, unknown.json()["reason"]) == (403, "unknown_app")
            for doc, reason in (({"path": "/\\\\evil.example/"}, "invalid_field:path"),
                                ({"path": "/", "headers": {"bad name": "x"}},
                                 "invalid_field:headers"),
                                ({"path": "/", "headers": [["x-a", "v\u0001"]]},
                                 "invalid_field:headers")):
                refused = await client.post(world.cp.url + "/v1/proxy/shop", json=doc)
                assert (refused.status_code, refused.json()["reason"]) == (400, reason), doc
            # the agent resets the stream after the head: a JSON 502, not a 500
            broken = await client.post(world.cp.url + "/v1/proxy/shop", json={"path": "/cut"})
            assert (broken.status_code, broken.json()["reason"]) == (502, "agent_error")


async def test_the_proxy_listener_forwards_only_origin_form_targets(mock_clock: MockClock,
                                                                   world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        for target in (b"http://169.254.169.254/latest", b"//evil.example/x", b"*"):
            stream = await trio.open_tcp_stream("127.0.0.1", world.cp.bound.proxy_port)
            async with stream:
                await stream.send_all(b"GET " + target + b" HTTP/1.1\r\n"
                                      b"Host: shop.app.example.com\r\n\r\n")
                reply = b""
                while b"invalid_target" not in reply and (data := await stream.receive_some()):
                    reply += data
            assert reply.startswith(b"HTTP/1.1 400 "), (target, reply)
            assert b'"reason":"invalid_target"' in reply
        assert server.requests == []  # nothing reached the backend


async def test_auth_listener_answers_like_resolve(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        async with httpx.AsyncClient() as client:
            fast = await client.get(world.cp.auth_url + "/v1/resolve/shop")
            slow = await client.get(world.cp.url + "/v1/resolve/shop")
            assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
            assert fast.headers["x-ee-allowed"] == "true"
            by_host = await client.get(world.cp.auth_url + "/v1/resolve",
                                       headers={"X-Original-Host": "shop.app.example.com"})
            assert by_host.status_code == 200
            other = await client.get(world.cp.auth_url + "/v1/apps")
            assert other.status_code == 404
            denied = await client.get(world.cp.auth_url + "/v1/resolve/nosuch")
            assert (denied.status_code, denied.json()["reason"]) == (403, "unknown_app")


async def test_metrics(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        assert (await proxy_get(world.cp, "/hello")).status_code == 200
        # names nobody registered share one series: a client picking random Host names
        # cannot grow the metrics (and eecp's memory) without bound
        for n in range(5):
            assert (await proxy_get(world.cp, "/x", host=f"nosuch{n}.app")).status_code == 403
        # the control port's POST /v1/proxy counts the same way
        async with httpx.AsyncClient() as client:
            api = world.cp.url + "/v1/proxy/"
            assert (await client.post(api + "shop", json={"path": "/hello"})).status_code == 200
            assert (await client.post(api + "other", json={"path": "/"})).status_code == 403
            # bodies both ways, and the time to the head, on both entry points
            echoed = await client.post(world.cp.proxy_url + "/echo", content=b"u" * 300,
                                       headers={"Host": "shop.app.example.com"})
            assert (echoed.status_code, echoed.content) == (201, b"u" * 300)
            ping = await client.post(api + "shop", json={
                "method": "POST", "path": "/echo", "body_b64": base64.b64encode(b"ping").decode()})
            assert ping.json()["status"] == 201
        text = (await world.cp.get("/metrics")).text
    assert 'eecp_attestations_total{reason="attested",result="accepted"} 1.0' in text
    assert 'eecp_proxy_requests_total{app="shop",status="200"} 2.0' in text
    assert 'eecp_proxy_requests_total{app="_unknown",status="403"} 6.0' in text
    assert "nosuch" not in text
    assert "eecp_agents_connected 1.0" in text
    assert 'eecp_apps{state="ok"} 1.0' in text
    assert "eecp_attestation_seconds_count 1.0" in text
    assert 'eecp_proxy_requests_total{app="shop",status="201"} 2.0' in text
    assert "eecp_proxy_seconds_count 4.0" in text
    assert 'eecp_proxy_bytes_total{direction="in"} 304.0' in text
    assert 'eecp_proxy_bytes_total{direction="out"} 332.0' in text  # 2 x 14 + 300 + 4


async def test_streams_in_flight_are_counted(mock_clock: MockClock, world: World) -> None:
    async with open_backend("one") as (backend, server), \
            running_agent(world.agent(server)) as agent, trio.open_nursery() as nursery:
        await agent.wait_status("attested")
        assert "eecp_streams_in_flight 0.0" in (await world.cp.get("/metrics")).text
        done = trio.Event()

        async def hold() -> None:
            assert (await proxy_get(world.cp, "/hang")).text == "late"
            done.set()
        nursery.start_soon(hold)
        await backend.entered.wait()
        assert "eecp_streams_in_flight 1.0" in (await world.cp.get("/metrics")).text
        backend.release.set()
        await done.wait()
        assert "eecp_streams_in_flight 0.0" in (await world.cp.get("/metrics")).text

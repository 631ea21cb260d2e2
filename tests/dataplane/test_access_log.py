"""The access log (:mod:`eecp.dataplane.access`): one ``eecp.access`` line per proxied request
on both entry points, naming the agent and the release that served it, through real sockets
(the world, backends and fake agents of test_proxy); and the agent headers of
``EE_PROXY_EXPOSE_AGENT``."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import httpx
import pytest
from trio.testing import MockClock

from eecp.core import logs
from eecp.dataplane.access import FIELDS, MAX_VALUE_CHARS, _value
from eecp.dev import pki as devpki
from tests.dataplane import test_proxy
from tests.dataplane.test_proxy import World, open_backend, open_world, proxy_get
from tests.harness import TAG, ControlPlane, eventually, resolve_until, running_agent

# test_proxy's fixtures: its session's PKI, its world of eecp and upstreams
pki = test_proxy.pki
world = test_proxy.world

#: the client as a trusted proxy (loopback, EE_TRUSTED_PROXIES' default) names it
CLIENT = {"X-Forwarded-For": "203.0.113.7"}


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "eecp.access"]


def fields(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split(" "))


async def one_line(caplog: pytest.LogCaptureFixture, count: int) -> dict[str, str]:
    """The ``count``-th line, once it is there (it is written as the request ends: maybe
    after the client has its answer)."""
    await eventually(lambda: len(lines(caplog)) >= count)
    assert len(lines(caplog)) == count
    return fields(lines(caplog)[-1])


async def api_call(cp: ControlPlane, doc: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=None) as client:
        return await client.post(cp.url + "/v1/proxy/shop", json=doc, headers=CLIENT)


@pytest.fixture(autouse=True)
def access_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="eecp.access")


async def test_a_proxied_request_names_its_agent_and_release_and_never_its_query(
        mock_clock: MockClock, world: World, caplog: pytest.LogCaptureFixture) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        response = await proxy_get(world.cp, "/hello?token=s3cret", headers={
            "Host": "shop.app.example.com", "Authorization": "Bearer hdr-s3cret", **CLIENT})
        assert response.status_code == 200
        line = await one_line(caplog, 1)
        assert line == {"via": "proxy", "client": "203.0.113.7", "method": "GET", "app": "shop",
                        "path": "/hello", "status": "200", "in": "0",
                        "out": str(len(b"hello from one")), "ms": line["ms"],
                        "agent": agent.agent_id, "release": TAG, "reason": "-"}
        async with httpx.AsyncClient() as client:
            echoed = await client.post(world.cp.proxy_url + "/echo?x=1", content=b"x" * 300_000,
                                       headers={"Host": "shop.app.example.com"})
        assert echoed.status_code == 201
        line = await one_line(caplog, 2)
        assert (line["method"], line["path"], line["status"]) == ("POST", "/echo", "201")
        assert line["client"] == "-"  # only a trusted proxy (loopback) in its chain
        assert (line["in"], line["out"]) == ("300000", "300000")
    assert "s3cret" not in caplog.text  # neither the query nor a header


async def test_refusals_carry_their_reason(mock_clock: MockClock, world: World,
                                           caplog: pytest.LogCaptureFixture) -> None:
    unknown = await proxy_get(world.cp, "/x?q=1", host="nosuch.app.example.com")
    assert unknown.status_code == 403
    line = await one_line(caplog, 1)
    assert (line["app"], line["path"], line["status"]) == ("nosuch", "/x", "403")
    assert (line["agent"], line["release"], line["reason"]) == ("-", "-", "unknown_app")
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")  # shop is registered now; then its agent leaves
    await resolve_until(world.cp, "shop", lambda body: body["reason"] == "not_connected")
    idle = await proxy_get(world.cp, "/x")
    assert idle.status_code == 403
    assert (await one_line(caplog, 2))["reason"] == "not_connected"
    unnamed = await proxy_get(world.cp, "/x", host="127.0.0.1:9")
    assert unnamed.status_code == 400
    line = await one_line(caplog, 3)
    assert (line["app"], line["status"], line["reason"]) == ("-", "400", "missing_app")


async def test_the_json_proxy_logs_its_calls(mock_clock: MockClock, world: World,
                                             caplog: pytest.LogCaptureFixture) -> None:
    async with open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        answer = await api_call(world.cp, {"method": "POST", "path": "/echo?t=s3cret",
                                           "body_b64": base64.b64encode(b"abcd").decode()})
        assert (answer.status_code, answer.json()["status"]) == (200, 201)
        line = await one_line(caplog, 1)
        assert line == {"via": "api", "client": "203.0.113.7", "method": "POST", "app": "shop",
                        "path": "/echo", "status": "201", "in": "4", "out": "4",
                        "ms": line["ms"], "agent": agent.agent_id, "release": TAG,
                        "reason": "-"}
        bad = await api_call(world.cp, {"path": "http://elsewhere/"})
        assert bad.status_code == 400
        line = await one_line(caplog, 2)
        assert (line["via"], line["status"], line["reason"]) == (
            "api", "400", "invalid_field:path")
    assert "s3cret" not in caplog.text


async def test_the_json_format_has_one_key_per_field(
        mock_clock: MockClock, world: World) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup_logging("json", "INFO", out)  # what EE_LOG_FORMAT=json sets up
        async with open_backend("one") as (_, server), \
                running_agent(world.agent(server)) as agent:
            await agent.wait_status("attested")
            assert (await proxy_get(world.cp, "/hello?q=1")).status_code == 200

            def logged() -> list[dict[str, object]]:
                docs = [json.loads(line) for line in out.getvalue().splitlines()]
                return [doc for doc in docs if doc["logger"] == "eecp.access"]
            await eventually(lambda: len(logged()) == 1)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (doc,) = logged()
    assert set(doc) == {"ts", "level", "logger", *FIELDS}
    assert (doc["via"], doc["path"], doc["status"], doc["bytes_out"]) == (
        "proxy", "/hello", 200, len(b"hello from one"))
    assert (doc["agent"], doc["release"], doc["reason"]) == (agent.agent_id, TAG, None)
    assert isinstance(doc["ms"], float)


@pytest.mark.parametrize(("setting", "expected"), [("on", 3), ("off", 0)])
async def test_access_log_off_writes_no_line(tmp_path: Path, pki: devpki.DevPki,
                                             mock_clock: MockClock,
                                             caplog: pytest.LogCaptureFixture, setting: str,
                                             expected: int) -> None:
    async with open_world(tmp_path, pki, mock_clock, EE_ACCESS_LOG=setting) as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        assert (await proxy_get(world.cp, "/hello")).status_code == 200
        assert (await proxy_get(world.cp, "/", host="nosuch.example")).status_code == 403
        assert (await api_call(world.cp, {"path": "/hello"})).status_code == 200
        if expected:
            await eventually(lambda: len(lines(caplog)) == expected)
    assert len(lines(caplog)) == expected


@pytest.mark.parametrize("exposed", [False, True])
async def test_agent_headers_name_the_agent_and_release_when_exposed_only(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock,
        exposed: bool) -> None:
    extra = {"EE_PROXY_EXPOSE_AGENT": "true"} if exposed else {}
    async with open_world(tmp_path, pki, mock_clock, **extra) as world, \
            open_backend("one") as (_, server), running_agent(world.agent(server)) as agent:
        await agent.wait_status("attested")
        for response in (await proxy_get(world.cp, "/hello"),
                         await api_call(world.cp, {"path": "/hello"})):
            assert response.status_code == 200
            assert response.headers.get_list("x-ee-agent") == (
                [agent.agent_id] if exposed else [])
            assert response.headers.get_list("x-ee-release") == ([TAG] if exposed else [])
        refused = await proxy_get(world.cp, "/", host="nosuch.example")
        assert refused.status_code == 403 and "x-ee-agent" not in refused.headers


@pytest.mark.parametrize(("raw", "shown"), [
    ("", "-"),
    ("/plain/path", "/plain/path"),
    ("a b", "a\\x20b"),  # a space would start a forged field
    ("x\nvia=forged", "x\\nvia=forged"),  # a line break a forged line
])
def test_a_value_cannot_forge_fields_or_lines(raw: str, shown: str) -> None:
    assert _value(raw) == shown


def test_a_long_value_is_cut() -> None:
    assert len(_value("/" + "a" * 5000)) == MAX_VALUE_CHARS + 3

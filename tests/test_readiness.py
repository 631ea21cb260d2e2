"""``GET /ready`` and systemd's notify protocol through a real serve(): a real ``AF_UNIX``
datagram socket stands in for systemd's notify socket (``NOTIFY_SOCKET``, a path or an
abstract name), time is trio's MockClock."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio.testing import MockClock

from eecp.core.config import from_env
from eecp.dev import pki as devpki
from eecp.service import Bound, serve
from eecp.wiring import open_services
from tests.harness import control_plane_env, open_control_plane, open_upstreams, real_deadline
from tests.test_service import config_env


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=20)


class FakeNotifySocket:
    """What systemd listens on: one datagram per notification."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as NOTIFY_SOCKET spells it

    async def next(self) -> dict[str, str]:
        """The next notification's fields (waiting in real time: the clock is a mock)."""
        async with real_deadline(10):
            await trio.lowlevel.wait_readable(self.sock)
        text = self.sock.recv(4096).decode()
        assert text.endswith("\n"), text
        return dict(line.split("=", 1) for line in text.splitlines())

    def pending(self) -> bool:
        try:
            return bool(self.sock.recv(4096, socket.MSG_PEEK))
        except BlockingIOError:
            return False


@asynccontextmanager
async def fake_notify_socket(where: str, tmp_path: Path) -> AsyncIterator[FakeNotifySocket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        if where == "abstract":
            name = f"eecp-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            yield FakeNotifySocket(sock, "@" + name)
        else:
            path = tmp_path / "notify"
            sock.bind(str(path))
            yield FakeNotifySocket(sock, str(path))


@pytest.mark.parametrize("where", ["path", "abstract"])
async def test_ready_watchdog_and_stopping_reach_the_notify_socket(
        mock_clock: MockClock, tmp_path: Path, pki: devpki.DevPki, where: str) -> None:
    async with fake_notify_socket(where, tmp_path) as notify, open_upstreams(pki) as (pccs, gh):
        env = control_plane_env(tmp_path, pki, pccs.url, gh.url, NOTIFY_SOCKET=notify.address,
                                WATCHDOG_USEC="20000000", WATCHDOG_PID=str(os.getpid()))
        async with open_control_plane(env, pki, pccs, gh) as cp:
            # READY=1 is sent before serve() reports started: every listener is bound
            assert await notify.next() == {"READY": "1",
                                           "STATUS": f"serving control on {cp.url}"}
            response = await cp.get("/ready")
            assert (response.status_code, response.json()) == (
                200, {"ready": True, "state": "ready"})
            assert await notify.next() == {"WATCHDOG": "1"}
            assert not notify.pending()
            mock_clock.jump(10)  # half of WATCHDOG_USEC
            assert await notify.next() == {"WATCHDOG": "1"}
        assert await notify.next() == {"STOPPING": "1", "STATUS": "shutting down"}


async def test_a_watchdog_meant_for_another_process_is_not_pinged(
        mock_clock: MockClock, tmp_path: Path, pki: devpki.DevPki) -> None:
    async with fake_notify_socket("path", tmp_path) as notify, open_upstreams(pki) as (pccs, gh):
        env = control_plane_env(tmp_path, pki, pccs.url, gh.url, NOTIFY_SOCKET=notify.address,
                                WATCHDOG_USEC="20000000", WATCHDOG_PID=str(os.getpid() + 1))
        async with open_control_plane(env, pki, pccs, gh):
            assert (await notify.next())["READY"] == "1"
            mock_clock.jump(30)
            await trio.testing.wait_all_tasks_blocked()
        assert await notify.next() == {"STOPPING": "1", "STATUS": "shutting down"}


async def test_ready_is_503_while_starting_and_once_shutdown_begins(tmp_path: Path) -> None:
    # The control app of a real process's components, asked in-process: over a socket the
    # instants before serve() marks it ready and after the shutdown fires are races (hypercorn
    # closes idle connections at once when it stops)
    config = from_env(config_env(tmp_path))
    shutdown = trio.Event()
    async with open_services(config) as components, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=components.control_app),  # type: ignore[arg-type]
            base_url="http://eecp") as client:
        async def ready() -> tuple[int, object]:
            response = await client.get("/ready")
            return response.status_code, response.json()

        assert await ready() == (503, {"ready": False, "state": "starting"})
        components.readiness.serving(until=shutdown)
        assert await ready() == (200, {"ready": True, "state": "ready"})
        shutdown.set()
        assert await ready() == (503, {"ready": False, "state": "stopping"})


async def test_without_notify_socket_nothing_is_sent_and_ready_still_answers(
        tmp_path: Path) -> None:
    config = from_env(config_env(tmp_path))
    assert config.notify_socket is None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound: Bound = await nursery.start(lambda task_status: serve(
            config, shutdown=shutdown, handle_signals=False, task_status=task_status))
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{bound.control_url}/ready")).status_code == 200
        shutdown.set()

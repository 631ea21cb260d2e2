"""A dead agent peer is noticed in seconds, not after ~15 minutes of TCP retransmissions.

An agent vanishes without closing its socket (power cut, cable pulled, VM frozen at the host):
no FIN, no RST, nothing. eecp's WebSocket pings then stay unacknowledged, and the
``TCP_USER_TIMEOUT`` that ``serve()`` puts on its listening sockets makes the kernel abort the
connection after ``EE_TUNNEL_DEAD_PEER_SEC``; the session ends and the app stops resolving.

To vanish for real, the agent runs in a network namespace of its own, reached over a veth pair
on a private /30; the test then takes the agent's end of the link down. The agent process and
its socket stay alive: only the wire is cut. The control check runs the very same scenario with
``TCP_USER_TIMEOUT`` unavailable and shows the pings alone do not notice anything in that time.

Needs root and ``ip netns`` (skipped otherwise). Real time (no MockClock); about 15 s in all.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from eecp.dev import pki as devpki
from tests.harness import ControlPlane, control_plane_env, open_control_plane, open_upstreams

REPO_ROOT = Path(__file__).resolve().parents[2]
PING_SEC = 0.5
DEAD_PEER_SEC = 2.0
#: what "about 30 s in production" becomes here (dead peer 2 s): the limit the test asserts
DETECT_WITHIN_SEC = 10.0
#: how long the control run (no TCP_USER_TIMEOUT) must stay blind
CONTROL_WATCH_SEC = 6.0

AGENT_SCRIPT = """\
import sys

import trio

from eecp.dev import pki as devpki
from tests.harness import FakeAgent


async def main() -> None:
    url, pki_dir, app = sys.argv[1:4]
    agent = FakeAgent(url, devpki.load_pki(pki_dir), app=app)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.wait_status("attested", 30)
        await agent.health()
        print("attested", flush=True)
        await agent.wait_closed(3600)
        print("closed", agent.closed, flush=True)


trio.run(main)
"""


def _netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a veth pair"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` unavailable: {probe.stderr.strip()}"
    return None


_UNAVAILABLE = _netns_unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")


@dataclass(frozen=True)
class Link:
    """A namespace reached over a veth pair: ``host_ip`` here, ``peer_ip`` in ``netns``."""

    netns: str
    host_if: str
    peer_if: str
    host_ip: str
    peer_ip: str


async def _ip(*args: str) -> None:
    result = await trio.run_process(["ip", *args], capture_stdout=True, capture_stderr=True,
                                    check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.decode().strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.213.0.0/16 that no interface of this host uses yet."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                           check=True).stdout
    for _ in range(64):
        net = ipaddress.IPv4Network(f"10.213.{random.randrange(256)}.0/30")
        if f" 10.213.{net.network_address.packed[2]}." not in shown:
            return net
    raise RuntimeError("no free /30 in 10.213.0.0/16")


@asynccontextmanager
async def veth_namespace() -> AsyncIterator[Link]:
    """A fresh namespace and veth pair on a private /30; both are deleted on the way out."""
    tag = secrets.token_hex(3)
    net = _free_subnet()
    host_ip, peer_ip = (str(a) for a in net.hosts())
    link = Link(f"eecp-dp-{tag}", f"eedp{tag}h", f"eedp{tag}n", host_ip, peer_ip)
    try:
        await _ip("netns", "add", link.netns)
    except RuntimeError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        await _ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if,
                  "netns", link.netns)
        await _ip("addr", "add", f"{host_ip}/{net.prefixlen}", "dev", link.host_if)
        await _ip("link", "set", link.host_if, "up")
        await _ip("-n", link.netns, "addr", "add", f"{peer_ip}/{net.prefixlen}", "dev",
                  link.peer_if)
        await _ip("-n", link.netns, "link", "set", link.peer_if, "up")
        await _ip("-n", link.netns, "link", "set", "lo", "up")
        yield link
    finally:
        with trio.CancelScope(shield=True):
            # deleting the namespace destroys its end of the pair, and with it ours; the
            # explicit delete covers a namespace that did not go (a process still in it)
            for args in (("netns", "del", link.netns), ("link", "del", link.host_if)):
                with suppress(RuntimeError):
                    await _ip(*args)


@asynccontextmanager
async def agent_in(link: Link, cp: ControlPlane, pki_dir: Path, log: Path
                   ) -> AsyncIterator[trio.Process]:
    """A FakeAgent process inside ``link.netns``, dialling the control plane over the veth."""
    script = log.with_name("netns_agent_main.py")  # not agent.py: it would shadow the package
    script.write_text(AGENT_SCRIPT)
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", link.netns, sys.executable, str(script), cp.ws_url,
             str(pki_dir), "shop"],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await process.wait()


async def connected(client: httpx.AsyncClient, cp: ControlPlane) -> int:
    response = await client.get(cp.url + "/health")
    assert response.status_code == 200, response.text
    return int(response.json()["agents_connected"])


async def wait_attested(client: httpx.AsyncClient, cp: ControlPlane, process: trio.Process,
                        log: Path, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while True:
        response = await client.get(cp.url + "/v1/resolve/shop")
        if response.status_code == 200 and await connected(client, cp) == 1:
            return
        if process.returncode is not None or time.monotonic() > end:
            output = await trio.Path(log).read_text(errors="replace")
            raise AssertionError(f"agent not attested (exit {process.returncode}):\n{output}")
        await trio.sleep(0.1)


async def run_scenario(tmp_path: Path) -> float | None:
    """Attest an agent across the veth, cut its end of the link and return how long the control
    plane took to drop the session (None if it still holds it after ``DETECT_WITHIN_SEC``, or
    ``CONTROL_WATCH_SEC`` when TCP_USER_TIMEOUT is unavailable)."""
    pki = devpki.make_pki(seed=23)
    pki_dir = tmp_path / "pki"
    devpki.save_pki(pki, pki_dir)
    watch = DETECT_WITHIN_SEC if hasattr(socket, "TCP_USER_TIMEOUT") else CONTROL_WATCH_SEC
    async with veth_namespace() as link, open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url,
                                EE_CONTROL_BIND=link.host_ip,
                                EE_TUNNEL_PING_INTERVAL_SEC=str(PING_SEC),
                                EE_TUNNEL_DEAD_PEER_SEC=str(DEAD_PEER_SEC),
                                EE_ATTEST_DEADLINE_SEC="60",
                                # the control run leaves a (dead) tunnel open: don't wait for it
                                EE_SHUTDOWN_GRACE_SEC="0.5")
        async with open_control_plane(env, pki, pccs, github) as cp, \
                httpx.AsyncClient(timeout=5) as client, \
                agent_in(link, cp, pki_dir, tmp_path / "agent.log") as process:
            assert cp.bound.control_host == link.host_ip
            await wait_attested(client, cp, process, tmp_path / "agent.log")
            # several pings crossed the link and were answered: the tunnel is healthy
            await trio.sleep(3 * PING_SEC)
            assert await connected(client, cp) == 1

            await _ip("-n", link.netns, "link", "set", link.peer_if, "down")
            cut = time.monotonic()
            while time.monotonic() - cut < watch:
                if await connected(client, cp) == 0:
                    elapsed = time.monotonic() - cut
                    break
                await trio.sleep(0.05)
            else:
                # the agent really is still running with its socket open: only the wire is cut
                assert process.returncode is None
                return None
            response = await client.get(cp.url + "/v1/resolve/shop")
            assert response.status_code == 403, response.text
            assert response.json()["reason"] == "not_connected"
            assert process.returncode is None, "the agent exited: the link was not the cause"
            return elapsed


async def test_dead_peer_is_dropped_within_seconds(tmp_path: Path) -> None:
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("this platform has no TCP_USER_TIMEOUT")
    elapsed = await run_scenario(tmp_path)
    assert elapsed is not None, f"dead peer still connected {DETECT_WITHIN_SEC}s after the cut"
    print(f"dead peer dropped {elapsed:.2f}s after the link was cut "
          f"(ping {PING_SEC}s, EE_TUNNEL_DEAD_PEER_SEC={DEAD_PEER_SEC})")
    # not before the kernel's timeout can have run out, and well within the limit
    assert DEAD_PEER_SEC * 0.9 <= elapsed < DETECT_WITHIN_SEC


async def test_without_tcp_user_timeout_pings_alone_do_not_notice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: same link cut, but the listening sockets get no TCP_USER_TIMEOUT (serve()
    only sets it when the platform has it). The kernel keeps retransmitting the pings and the
    session stays up, which is what makes the option necessary."""
    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT", raising=False)
    elapsed = await run_scenario(tmp_path)
    assert elapsed is None, f"dropped after {elapsed:.2f}s without TCP_USER_TIMEOUT"

"""``eecp demo`` end to end (real sockets, real time: the demo is what a newcomer runs first),
and the development PCCS it serves collateral from."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import pytest
import trio
from trio.testing import MockClock

from eecp import cli
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.dev.demo import (
    APP,
    HELLO,
    NODE,
    OUTAGE_SEC,
    PENALTY_MICROS,
    REPO,
    TAG,
    USER,
    DemoError,
    DemoLedger,
    DemoSettings,
    DemoUrls,
    open_accounts,
    serve_demo,
)
from eecp.dev.pccs import REISSUE_AFTER_SEC, DevPccs, pccs_answer
from eecp.service import Bound
from tests.e2e.test_ledger_e2e import until
from tests.harness import running_agent
from tests.ledgerkit import ADMIN, open_ledger_plane

WAIT = 30.0  # real seconds: PKI creation, attestation, shutdown (hypercorn lingers up to 5 s)
ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def running_demo(directory: Path, *, ledger: bool = False, **more: Any
                       ) -> AsyncIterator[DemoUrls]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            urls: DemoUrls = await nursery.start(partial(
                serve_demo, DemoSettings(directory, 0, 0, 0, ledger=ledger, **more),
                shutdown=shutdown, handle_signals=False))
        yield urls
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + WAIT


def proxy_url(urls: DemoUrls) -> str:
    return f"http://127.0.0.1:{urls.bound.proxy_port}"


HOST = {"Host": f"{APP}.localhost"}


async def test_demo_attests_its_agent_and_proxies_to_its_app(tmp_path: Path) -> None:
    async with running_demo(tmp_path / "demo") as urls, httpx.AsyncClient(timeout=WAIT) as http:
        resolved = await http.get(f"{urls.control}/v1/resolve/{APP}")
        assert resolved.status_code == 200, resolved.text
        doc = resolved.json()
        assert (doc["repo"], doc["release_tag"], doc["network"]) == (REPO, TAG, "sandbox-1")
        assert doc["attestation"]["status"] == "attested" and doc["connected"] is True
        fast = await http.get(f"{urls.auth}/v1/resolve/{APP}")
        assert (fast.status_code, fast.json()) == (200, doc)

        hello = await http.get(proxy_url(urls) + "/", headers=HOST)
        assert (hello.status_code, hello.content) == (200, HELLO)
        echoed = await http.post(proxy_url(urls) + "/echo", headers=HOST, content=b"x" * 70_000)
        assert (echoed.status_code, echoed.content) == (200, b"x" * 70_000)
        async with http.stream("GET", proxy_url(urls) + "/events", headers=HOST) as events:
            assert events.headers["content-type"] == "text/event-stream"
            first = await events.aiter_text().__anext__()
            assert first.startswith("data: tick 0")
        as_json = await http.post(f"{urls.control}/v1/proxy/{APP}", json={"path": "/"})
        assert as_json.json()["status"] == 200

        app = (await http.get(f"{urls.control}/v1/apps/{APP}")).json()
        assert app["audit"][0]["verdict"] == "accepted"
        assert app["audit"][0]["tcb_status"] == "UpToDate"
        metrics = (await http.get(f"{urls.control}/metrics")).text
        assert 'eecp_attestations_total{reason="attested",result="accepted"} 1.0' in metrics
        assert "eecp_agents_connected 1.0" in metrics
        health = (await http.get(f"{urls.control}/health")).json()
        assert health["dev_root_ca"] is True  # the demo says loudly what it trusts


async def test_a_second_run_reuses_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    async with running_demo(directory):
        root = (directory / "dev-pki" / "root.pem").read_bytes()
        agent_id = (directory / "agent-id").read_text()
    async with running_demo(directory) as urls, httpx.AsyncClient(timeout=WAIT) as http:
        assert (directory / "dev-pki" / "root.pem").read_bytes() == root
        assert (directory / "agent-id").read_text() == agent_id
        app = (await http.get(f"{urls.control}/v1/apps/{APP}")).json()
        # the store kept the first run's attestation; this run attested again
        assert [e["verdict"] for e in app["audit"]] == ["accepted", "accepted"]
        allowlist = json.loads((directory / "allowlists" / REPO / f"{TAG}.json").read_text())
        assert allowlist["measurements"]["sealed"] is False


async def test_the_ledger_demo_binds_its_agent_and_its_printed_commands_hold_usage(
        tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    async with running_demo(directory, ledger=True) as urls, \
            httpx.AsyncClient(timeout=WAIT) as http:
        demo = urls.ledger
        assert demo is not None and len(demo.admin_token) >= 32
        admin = {"Authorization": f"Bearer {demo.admin_token}"}
        assert (await http.get(f"{urls.control}/v1/apps/{APP}")).status_code == 401
        app = (await http.get(f"{urls.control}/v1/apps/{APP}", headers=admin)).json()
        assert [(a["ppid"], a["node_id"]) for a in app["agents"]] == [(demo.ppid, NODE)]
        # the printed commands, run as printed (one shell, the token and period exported)
        lines = [line.strip() for line in urls.lines()]
        script = [line for line in lines if line.startswith(("export T=", "P=$(date"))]
        node_cmd = next(line for line in lines if line.endswith(f"/v1/nodes/{NODE}"))
        stake_cmd = next(line for line in lines if line.endswith(f"/v1/balances/stake:{NODE}"))
        usage = next(line for line in lines if "/v1/usage/report" in line)
        balance = next(line for line in lines if line.endswith(f"/v1/balances/{USER}"))
        settle = next(line for line in lines if "/v1/settlements/" in line)
        assert "eecp demo --ledger --slash" in lines  # how to see a slash
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed: the printed commands cannot be run")
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["bash", "-c", "\n".join([*script, node_cmd, "echo", stake_cmd, "echo", usage,
                                      "echo", balance, "echo", settle])],
            capture_output=True, text=True, timeout=WAIT))
        node, stake, held, after, settlement = (
            json.loads(line) for line in done.stdout.splitlines())
        # premium at $0.002 x 1 vCPU: a penalty, and minimum stake, of 720 h of it: $1.44
        assert node["platforms"] == [demo.ppid] and [a["up"] for a in node["agents"]] == [True]
        assert (node["terms"]["tier"], node["stake"]["min_required_micros"]) == (
            "premium", PENALTY_MICROS), node
        assert node["stake"]["ok"] is True and node["slashes"] == []
        assert (stake["posted_micros"], stake["balance_micros"]) == (5_000_000, 5_000_000)
        assert (held["status"], held["amount_micros"]) == ("held", 20), done.stderr
        assert after["balance_micros"] == 10_000_000 - 20
        assert (settlement["status"], settlement["holds"]) == ("open", 1)
        finalize = await http.post(f"{urls.control}/v1/settlements/{held['period']}/finalize",
                                   json={"node_id": NODE}, headers=admin)
        assert (finalize.status_code, finalize.json()["error"]) == (409, "period_not_ended")
        check = (await http.get(f"{urls.control}/v1/ledger/check", headers=admin)).json()
        assert check["ok"] is True
    # a second run replays its set-up: the same token, no second deposit or purchase; with
    # --slash (a short outage here) it cuts its agent's tunnel once and starts it again
    async with running_demo(directory, ledger=True, slash=True, outage_sec=1) as again, \
            httpx.AsyncClient(timeout=WAIT) as http:
        assert again.ledger is not None and again.ledger.admin_token == demo.admin_token
        admin = {"Authorization": f"Bearer {demo.admin_token}"}
        alice = (await http.get(f"{again.control}/v1/balances/{USER}", headers=admin)).json()
        assert alice["posted_micros"] == 10_000_000
        stake = (await http.get(f"{again.control}/v1/balances/stake:{NODE}",
                                headers=admin)).json()
        assert stake["posted_micros"] == 5_000_000
        assert (directory / "admin-token").stat().st_mode & 0o777 == 0o600
        printed = "\n".join(again.lines())
        assert "--slash: the agent's tunnel is cut now for 1 s" in printed
        assert printed.count("/v1/balances/slash:platform") == 1
        # the tunnel closes (counted downtime: not eecp's doing), and the agent is back
        events = await _agent_events(directory / "control-plane.db", lambda found: any(
            reason.startswith("disconnected:") for _, reason, _ in found[:-1])
            and found[-1][:2] == ("up", "attested"))
        cut = next(i for i, (_, reason, _) in enumerate(events)
                   if reason.startswith("disconnected:"))
        assert [kind for kind, _, _ in events[cut:]] == ["down", "up"], events
        assert events[cut + 1][2] - events[cut][2] >= 1, events
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--ledger"]).ledger is True
    assert parser.parse_args(["demo", "--slash"]).slash is True


Events = list[tuple[str, str, float]]


async def _agent_events(db: Path, done: Callable[[Events], bool]) -> Events:
    """The demo agent's availability events ``(kind, reason, at)``, once ``done`` says so
    (real time: the demo's clock is the system's)."""
    def read() -> Events:
        with closing(sqlite3.connect(db)) as conn:
            return [(k, r, float(a)) for k, r, a in conn.execute(
                "SELECT kind, reason, at FROM availability_event ORDER BY at, id")]

    with trio.fail_after(WAIT):
        while not done(found := await trio.to_thread.run_sync(read)):
            await trio.to_thread.run_sync(time.sleep, 0.1)  # (a file polled: no event to wait on)
    return found


async def test_the_ledger_demo_s_node_is_slashed_once_for_its_outage(
        tmp_path: Path, pki: devpki.DevPki, mock_clock: MockClock) -> None:
    """What ``--slash`` shows, on trio's mock clock rather than in minutes of real time: the
    demo's own set-up (premium, $0.002 x 1 vCPU, $5 staked) and its outage (the agent gone for
    ``OUTAGE_SEC``) give one slash of $1.44 to slash:platform, which the printed commands
    show."""
    async with open_ledger_plane(tmp_path, pki, mock_clock) as plane:
        ppid = uuid.uuid4().bytes
        demo = DemoLedger(ADMIN, ppid.hex())
        await open_accounts(plane.cp.url, demo)
        agent = plane.agent(NODE, ppid)
        async with running_agent(agent):
            await agent.wait_status("attested")
            await until(plane, f"/v1/nodes/{NODE}", lambda d: bool(d["claims"]))
            await plane.ok("POST", f"/v1/nodes/{NODE}/platforms", json={"ppid": ppid.hex()})
            await until(plane, f"/v1/nodes/{NODE}",
                        lambda d: [a["up"] for a in d["agents"]] == [True])
            await plane.advance(5)  # (events at one instant are ordered down before up)
        await until(plane, f"/v1/nodes/{NODE}",
                    lambda d: [a["up"] for a in d["agents"]] == [False])
        await plane.advance(OUTAGE_SEC)
        back = plane.agent(NODE, ppid)
        back.agent_id = agent.agent_id
        async with running_agent(back):
            await back.wait_status("attested")
            await plane.advance(3 * 60)  # the outage's periods end and are settled
            _, last = plane.period(-1)
            await until(plane, f"/v1/settlements/{last}?node_id={NODE}",
                        lambda d: d["status"] == "settled")
            bound = Bound(plane.cp.config.control_bind, plane.cp.config.control_port)
            lines = DemoUrls(bound, ledger=demo, outage_sec=OUTAGE_SEC).lines()
            shown = {}
            for line in (line.strip() for line in lines):
                if line.startswith("curl ") and line.endswith((
                        f"/v1/nodes/{NODE}", f"/v1/balances/stake:{NODE}",
                        "/v1/balances/slash:platform")):
                    shown[line.rsplit("/", 1)[1]] = await plane.ok(
                        "GET", urlsplit(line.rsplit(" ", 1)[1]).path)
        node = shown[NODE]
        assert [s["amount_micros"] for s in node["slashes"]] == [PENALTY_MICROS], node
        assert node["slashes"][0]["kind"] == "slash_availability"
        assert node["slashes"][0]["detail"]["allowed_seconds"] == 25.92
        assert node["slashes"][0]["detail"]["down_seconds"] >= OUTAGE_SEC
        assert shown[f"stake:{NODE}"]["posted_micros"] == 5_000_000 - PENALTY_MICROS
        assert shown["slash:platform"]["balance_micros"] == PENALTY_MICROS
        assert node["stake"]["ok"] is True  # $3.56 still covers the $1.44 minimum
        # the next run of the demo tops the stake back up, once
        for _ in range(2):
            await open_accounts(plane.cp.url, demo)
        stake = await plane.ok("GET", f"/v1/balances/stake:{NODE}")
        assert stake["posted_micros"] == 5_000_000
        assert (await plane.ok("GET", f"/v1/balances/node:{NODE}"))["balance_micros"] == 0


async def test_a_demo_stopped_before_its_agent_is_attested_says_so(tmp_path: Path) -> None:
    shutdown = trio.Event()
    shutdown.set()
    with trio.fail_after(WAIT), pytest.RaisesGroup(
            pytest.RaisesExc(DemoError, match="demo_stopped"), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_demo, DemoSettings(tmp_path / "demo", 0, 0, 0),
                                        shutdown=shutdown, handle_signals=False))


def test_eecp_demo_prints_what_to_try_and_stops_on_sigint(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "eecp", "demo", "--dir", str(tmp_path / "demo"),
         "--control-port", "0", "--proxy-port", "0", "--auth-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EE_LOG_LEVEL": "WARNING"})
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + WAIT
        while not lines or lines[-1] != "Ctrl-C stops everything.\n":
            assert time.monotonic() < deadline, lines
            line = process.stdout.readline()
            assert line, f"demo exited: {process.wait()} {process.stderr.read()}"  # type: ignore[union-attr]
            lines.append(line)
        printed = "".join(lines)
        proxy = re.search(r"curl (http://hello\.localhost:(\d+))/ ", printed)
        assert proxy, printed
        answer = httpx.get(f"http://127.0.0.1:{proxy.group(2)}/", headers=HOST, timeout=WAIT)
        assert answer.content == HELLO
        # the resolve URLs (control port, then auth listener) and /metrics answer as printed
        resolves = re.findall(r"curl -i (http://127\.0\.0\.1:\d+/v1/resolve/hello) ", printed)
        assert len(set(resolves)) == 2, printed
        for url in resolves:
            resolved = httpx.get(url, timeout=WAIT)
            assert resolved.status_code == 200, (url, resolved.text)
            assert resolved.json()["allowed"] is True and resolved.json()["app"] == APP
        metrics_url = re.search(r"curl (http://127\.0\.0\.1:\d+/metrics) ", printed)
        assert metrics_url, printed
        metrics = httpx.get(metrics_url.group(1), timeout=WAIT)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "eecp_agents_connected 1.0" in metrics.text
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_eecp_demo_reports_a_port_in_use_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "eecp", "demo", "--dir", str(tmp_path / "demo"),
             "--control-port", "0", "--proxy-port", str(port), "--auth-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "EE_LOG_LEVEL": "ERROR"})
    assert done.returncode == 1
    assert done.stderr.startswith("eecp demo: ") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


# ---- the development PCCS -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=7)


def _query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, dict(parse_qsl(parts.query))


def test_dev_pccs_answers_like_intels_pcs(pki: devpki.DevPki) -> None:
    parts = devmint.make_collateral(pki, now=1_800_000_000)
    fmspc = devmint.DEFAULT_FMSPC
    tcb = pccs_answer(parts, fmspc, "GET", *_query(f"/tdx/certification/v4/tcb?fmspc={fmspc}"))
    assert tcb.status == 200
    envelope = tcb.body.decode()
    assert envelope.startswith('{"tcbInfo":' + parts.tcb_info + ",")  # signed text verbatim
    assert unquote(dict(tcb.headers)["TCB-Info-Issuer-Chain"]) == parts.tcb_info_issuer_chain
    crl = pccs_answer(parts, fmspc, "GET", *_query("/sgx/certification/v4/pckcrl?ca=platform"))
    assert (crl.status, crl.body) == (200, parts.pck_crl)
    assert pccs_answer(parts, fmspc, "GET", *_query("/sgx/certification/v4/rootcacrl")).body \
        == parts.root_ca_crl
    qe = pccs_answer(parts, fmspc, "GET", *_query("/tdx/certification/v4/qe/identity"))
    assert json.loads(qe.body)["enclaveIdentity"] == json.loads(parts.qe_identity)
    other = "11" * 6
    assert pccs_answer(parts, fmspc, "GET",
                       *_query(f"/tdx/certification/v4/tcb?fmspc={other}")).status == 404
    assert pccs_answer(parts, fmspc, "GET",
                       *_query("/sgx/certification/v4/pckcrl?ca=nope")).status == 400
    assert pccs_answer(parts, fmspc, "POST", *_query("/sgx/certification/v4/rootcacrl")
                       ).status == 405
    assert pccs_answer(parts, fmspc, "GET", *_query("/sgx/certification/v4/tcb")).status == 404


def test_dev_pccs_mints_fresh_collateral_once_a_day(pki: devpki.DevPki) -> None:
    now = [1_800_000_000.0]
    pccs = DevPccs(pki, now=lambda: now[0])
    first = pccs.collateral()
    now[0] += REISSUE_AFTER_SEC - 1
    assert pccs.collateral() is first
    now[0] += 1
    fresh = pccs.collateral()
    assert fresh is not first
    assert json.loads(fresh.tcb_info)["issueDate"] > json.loads(first.tcb_info)["issueDate"]

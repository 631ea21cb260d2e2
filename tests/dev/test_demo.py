"""``eecp demo`` end to end (real sockets, real time: the demo is what a newcomer runs first),
and the development PCCS it serves collateral from."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import pytest
import trio

from eecp import cli
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.dev.demo import (
    APP,
    HELLO,
    NODE,
    REPO,
    TAG,
    USER,
    DemoError,
    DemoSettings,
    DemoUrls,
    serve_demo,
)
from eecp.dev.pccs import REISSUE_AFTER_SEC, DevPccs, pccs_answer

WAIT = 30.0  # real seconds: PKI creation, attestation, shutdown (hypercorn lingers up to 5 s)
ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def running_demo(directory: Path, *, ledger: bool = False) -> AsyncIterator[DemoUrls]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            urls: DemoUrls = await nursery.start(partial(
                serve_demo, DemoSettings(directory, 0, 0, 0, ledger=ledger), shutdown=shutdown,
                handle_signals=False))
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
        node = (await http.get(f"{urls.control}/v1/nodes/{NODE}", headers=admin)).json()
        assert node["platforms"] == [demo.ppid] and node["stake"]["ok"] is True
        assert [a["up"] for a in node["agents"]] == [True]
        app = (await http.get(f"{urls.control}/v1/apps/{APP}", headers=admin)).json()
        assert [(a["ppid"], a["node_id"]) for a in app["agents"]] == [(demo.ppid, NODE)]
        # the printed commands, run as printed (one shell, the token and period exported)
        lines = [line.strip() for line in urls.lines()]
        script = [line for line in lines if line.startswith(("export T=", "P=$(date"))]
        usage = next(line for line in lines if "/v1/usage/report" in line)
        balance = next(line for line in lines if line.endswith(f"/v1/balances/{USER}"))
        settle = next(line for line in lines if "/v1/settlements/" in line)
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed: the printed commands cannot be run")
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["bash", "-c", "\n".join([*script, usage, "echo", balance, "echo", settle])],
            capture_output=True, text=True, timeout=WAIT))
        held, after, settlement = (json.loads(line) for line in done.stdout.splitlines())
        assert (held["status"], held["amount_micros"]) == ("held", 25_000), done.stderr
        assert after["balance_micros"] == 10_000_000 - 25_000
        assert (settlement["status"], settlement["holds"]) == ("open", 1)
        finalize = await http.post(f"{urls.control}/v1/settlements/{held['period']}/finalize",
                                   json={"node_id": NODE}, headers=admin)
        assert (finalize.status_code, finalize.json()["error"]) == (409, "period_not_ended")
        check = (await http.get(f"{urls.control}/v1/ledger/check", headers=admin)).json()
        assert check["ok"] is True
    # a second run replays its set-up: the same token, no second deposit or purchase
    async with running_demo(directory, ledger=True) as again, \
            httpx.AsyncClient(timeout=WAIT) as http:
        assert again.ledger is not None and again.ledger.admin_token == demo.admin_token
        admin = {"Authorization": f"Bearer {demo.admin_token}"}
        alice = (await http.get(f"{again.control}/v1/balances/{USER}", headers=admin)).json()
        assert alice["posted_micros"] == 10_000_000
        assert (directory / "admin-token").stat().st_mode & 0o777 == 0o600
    assert cli.build_parser().parse_args(["demo", "--ledger"]).ledger is True


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

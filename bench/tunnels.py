"""Tunnel bench: admit N agents into a real ``eecp serve`` and measure what it costs.

Run by hand from the repository root (not part of the test suite)::

    python bench/tunnels.py --agents 500

What runs where:

* the control plane is ``python -m eecp serve`` in a subprocess (SQLite in a temp dir, a fresh
  test PKI as ``EE_DCAP_ROOT_CA``), exactly as an operator starts it;
* the stand-in PCCS and GitHub (``tests.fake_pccs``, ``tests.fake_github``) and the N agents run
  in this process, on loopback. Each agent opens ``/v1/tunnel``, registers its own app
  (``bench-0000``...), answers the register challenge with a genuine quote minted under the test
  PKI, then sends health every 30 s;
* the resolve probe (this file with ``--probe``) is a third process, so that the bench's own busy
  event loop adds nothing to the resolve latencies it measures.

The run: start eecp, admit one warm-up agent (app ``canary``: fills the collateral and allowlist
caches), read eecp's RSS, then connect the N agents at once (handshakes at most
``--connect-concurrency`` at a time) while the probe asks ``GET /v1/resolve/canary`` every
``--resolve-interval`` seconds over one keep-alive connection (requests that start between the
first connect and the last "attested" count as "during the burst"). When ``/health`` counts
N+1 tunnels and ``GET /v1/apps`` shows N+1 apps allowed, read RSS again, time a few hundred
resolves with the N tunnels idle, and print the figures. Every figure printed was measured in
this run.

The bench mints quotes in its own (single) trio thread, so on a small machine it competes with
eecp for CPU: admission rates here are a lower bound. "RSS per tunnel" is (RSS with N+1 idle
tunnels - RSS with the warm-up tunnel) / N: everything an admitted agent costs eecp's process
(session tasks, WebSocket, registry entries, caches), not the kernel's socket buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/tunnels.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url  # noqa: E402

from eecp.dev import mint as devmint  # noqa: E402
from eecp.dev import pki as devpki  # noqa: E402
from eecp.wire.measurements import report_data_for  # noqa: E402
from eecp.wire.protocol import (  # noqa: E402
    AttestResponse,
    Register,
    encode_attest_response,
    encode_register,
)
from tests.fake_github import open_fake_github  # noqa: E402
from tests.fake_pccs import open_fake_pccs  # noqa: E402
from tests.harness import ASSET, MEAS, REPO, TAG, allowlist_doc  # noqa: E402

ADMIN_TOKEN = "bench-admin"
HEALTH_EVERY_SEC = 30.0


# ---- the agents ---------------------------------------------------------------------------


@dataclass
class BenchAgent:
    """A minimal agent: register, answer challenges with minted quotes, send health."""

    url: str
    pki: devpki.DevPki
    app: str
    agent_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = 0.0  # monotonic, when it began to connect
    connected_at: float = 0.0  # handshake done
    attested_at: float = 0.0  # "attested" status received
    closed: tuple[int, str | None] | None = None
    error: str | None = None
    attested: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)

    def answer(self, nonce: bytes) -> str:
        report_data = report_data_for(MEAS, nonce)
        minted = devmint.mint_tdx_quote(self.pki, now=time.time(), report_data=report_data)
        return encode_attest_response(AttestResponse(nonce, minted.quote, report_data,
                                                     MEAS.as_dict()))

    async def run(self, handshakes: trio.Semaphore) -> None:
        self.started = time.monotonic()
        try:
            async with AsyncExitStack() as stack:
                async with handshakes:
                    ws = await stack.enter_async_context(
                        open_websocket_url(self.url, connect_timeout=120))
                self.connected_at = time.monotonic()
                await ws.send_message(encode_register(Register(
                    REPO, TAG, self.app, "forge-1", self.agent_id), tunnel_version="bench"))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, ws)
                    await self.attested.wait()
                    nursery.start_soon(self._health, ws)
        except ConnectionClosed as exc:
            reason = exc.reason
            self.closed = (reason.code, reason.reason) if reason else (1006, None)
        except Exception as exc:  # a refused handshake, a reset...: report it, go on
            self.error = repr(exc)
        finally:
            self.ended.set()

    async def wait_attested(self) -> None:
        """Until attested; raises if the tunnel ended first."""
        async with trio.open_nursery() as nursery:
            async def ended() -> None:
                await self.ended.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(ended)
            await self.attested.wait()
            nursery.cancel_scope.cancel()
        if not self.attested.is_set():
            raise RuntimeError(f"agent {self.app} never attested: error={self.error} "
                               f"closed={self.closed}")

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            message = json.loads(await ws.get_message())
            kind = message.get("type")
            if kind == "attest_request":
                await ws.send_message(self.answer(bytes.fromhex(message["nonce"])))
            elif kind == "status" and message.get("reason") == "attested" \
                    and not self.attested.is_set():
                self.attested_at = time.monotonic()
                self.attested.set()
            elif kind == "status" and message.get("state") == "invalid":
                self.error = f"refused: {message.get('reason')}"

    async def _health(self, ws: WebSocketConnection) -> None:
        while True:
            await ws.send_message('{"type":"health","status":"pass"}')
            await trio.sleep(HEALTH_EVERY_SEC)


# ---- measuring ----------------------------------------------------------------------------


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``) of ``pid`` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def cpu_sec(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_sec() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``values`` not empty)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


@dataclass
class Resolves:
    latencies: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)  # monotonic start of each request
    failures: list[str] = field(default_factory=list)

    def until(self, end: float) -> Resolves:
        """The samples of requests that started before ``end``."""
        return self._kept(lambda t: t <= end)

    def since(self, start: float) -> Resolves:
        """The samples of requests that started at or after ``start``."""
        return self._kept(lambda t: t >= start)

    def _kept(self, keep: Callable[[float], bool]) -> Resolves:
        kept = [i for i, t in enumerate(self.started) if keep(t)]
        return Resolves([self.latencies[i] for i in kept], [self.started[i] for i in kept],
                        self.failures)

    def summary(self) -> str:
        if not self.latencies:
            return "no sample"
        return (f"n={len(self.latencies)} p50={ms(percentile(self.latencies, 50))} "
                f"p99={ms(percentile(self.latencies, 99))} "
                f"max={ms(max(self.latencies))} non-200={len(self.failures)}")


def probe_main(url: str, interval: float, count: int) -> None:
    """The resolve probe (``--probe URL``), a process of its own so that the bench's busy event
    loop cannot add to the latencies it measures: GET ``url`` every ``interval`` s and print
    ``<monotonic start> <seconds> <status>`` per request, until SIGTERM (or ``count`` done)."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    done = 0
    with httpx.Client(timeout=30) as client:  # one keep-alive connection, like a proxy's
        while not stop and (count == 0 or done < count):
            started = time.monotonic()
            t0 = time.perf_counter()
            status = client.get(url).status_code
            print(f"{started:.6f} {time.perf_counter() - t0:.6f} {status}", flush=True)
            done += 1
            time.sleep(interval)


@asynccontextmanager
async def probing(url: str, interval: float, out: Path, count: int = 0
                  ) -> AsyncIterator[Resolves]:
    """Run the resolve probe for the block (or until ``count`` requests); the yielded
    :class:`Resolves` is filled when the block ends."""
    resolves = Resolves()
    with out.open("wb") as sink:
        probe = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--probe", url, "--resolve-interval", str(interval),
             "--resolves", str(count)], stdout=sink)
    try:
        for _ in range(600):  # up to 30 s for the probe to start resolving
            if len((await trio.Path(out).read_text()).splitlines()) >= 3 \
                    or probe.returncode is not None:
                break
            await trio.sleep(0.05)
        yield resolves
        if count:
            with trio.fail_after(120):
                await probe.wait()
    finally:
        with trio.CancelScope(shield=True):
            if probe.returncode is None:
                probe.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await probe.wait()
            if probe.returncode is None:
                probe.kill()
    for line in (await trio.Path(out).read_text()).splitlines():
        started, seconds, status = line.split()
        resolves.started.append(float(started))
        resolves.latencies.append(float(seconds))
        if status != "200":
            resolves.failures.append(status)


async def admitted_counts(client: httpx.AsyncClient, base: str) -> tuple[int, int]:
    """(tunnels registered per /health, apps allowed per GET /v1/apps)."""
    health = (await client.get(base + "/health")).json()
    apps = (await client.get(base + "/v1/apps",
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
    allowed = sum(1 for app in apps["apps"] if app.get("allowed"))
    return int(health["agents_connected"]), allowed


# ---- the control plane --------------------------------------------------------------------


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (eecp inherits it); fail early if that
    is still too small for ``needed`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        raise SystemExit(f"RLIMIT_NOFILE is {soft}, need about {needed}: raise `ulimit -Hn`")
    return soft, hard


@contextmanager
def eecp_process(env: dict[str, str], log: Path, switch_interval: float = 0.0
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m eecp serve`` with ``env``; SIGTERM (then SIGKILL) on the way out.

    ``switch_interval`` (experiment): run eecp with ``sys.setswitchinterval(switch_interval)``
    instead of Python's 5 ms, which bounds how long the event loop may wait for the GIL while a
    worker thread (store, quote verification) holds it."""
    command = [sys.executable, "-m", "eecp", "serve"]
    if switch_interval:
        command = [sys.executable, "-c", "import sys; sys.setswitchinterval("
                   f"{switch_interval}); sys.argv = ['eecp', 'serve']; "
                   "from eecp.cli import main; sys.exit(main())"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    """A loopback port nobody listens on right now (eecp takes it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_serving(process: subprocess.Popen[bytes], base: str, log: Path,
                       seconds: float = 30.0) -> None:
    """Until eecp answers ``GET /health`` with 200."""
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(int(seconds / 0.05)):
            if process.poll() is not None:
                break
            with suppress(httpx.TransportError):
                if (await client.get(base + "/health")).status_code == 200:
                    return
            await trio.sleep(0.05)
    text = await trio.Path(log).read_text(errors="replace")
    raise SystemExit(f"eecp did not start (exit {process.poll()}):\n{text[-3000:]}")


# ---- the run ------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """One run; the temp dir (database, logs) goes at the end unless ``--keep``."""
    limits = raise_fd_limit(2 * (args.agents + 1) + 200)
    work = Path(tempfile.mkdtemp(prefix="eecp-bench-"))
    try:
        figures = await run_bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures["fd_limit"] = limits[0]
    figures["eecp_log"] = str(work / "eecp.log") if args.keep else "(removed; --keep keeps it)"
    return figures


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n: int = args.agents
    pki = devpki.make_pki()
    root = work / "root.pem"
    pki.write_root(root)
    baseline = devmint.mint_tdx_quote(pki, now=time.time(), collateral_days=30)
    figures: dict[str, Any] = {"agents": n}
    async with open_fake_pccs(baseline.collateral_json) as pccs, \
            open_fake_github() as github:
        github.add_release(REPO, TAG, {ASSET: allowlist_doc()})
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EE_")}
        env.update({
            "PYTHONPATH": str(REPO_ROOT),
            "EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": str(port),
            "EE_DB_PATH": str(work / "eecp.db"), "EE_DCAP_ROOT_CA": str(root),
            "EE_PCCS_URL": pccs.url, "EE_GITHUB_API_URL": github.url,
            "EE_ADMIN_TOKEN": ADMIN_TOKEN, "EE_LOG_LEVEL": args.log_level,
        })
        if args.verify_workers:
            env["EE_VERIFY_WORKERS"] = str(args.verify_workers)
        figures["verify_workers"] = args.verify_workers or "default (2)"
        if args.store_workers:
            env["EE_STORE_WORKERS"] = str(args.store_workers)
        figures["store_workers"] = args.store_workers or "default (1 on SQLite)"
        log = work / "eecp.log"
        figures["switch_interval"] = args.switch_interval or "default (0.005)"
        with eecp_process(env, log, args.switch_interval) as process:
            await wait_serving(process, base, log)
            ws_url = base.replace("http://", "ws://") + "/v1/tunnel"
            async with httpx.AsyncClient(timeout=30) as client:
                figures["rss_start_kib"] = rss_kib(process.pid)
                handshakes = trio.Semaphore(args.connect_concurrency)
                async with trio.open_nursery() as agents:
                    # warm-up: one agent fills the collateral and allowlist caches
                    canary = BenchAgent(ws_url, pki, "canary")
                    agents.start_soon(canary.run, handshakes)
                    with trio.fail_after(60):
                        await canary.wait_attested()
                    await trio.sleep(1)
                    figures["rss_before_kib"] = rss_kib(process.pid)

                    burst = [BenchAgent(ws_url, pki, f"bench-{i:04d}") for i in range(n)]
                    canary_url = base + "/v1/resolve/canary"
                    async with probing(canary_url, args.resolve_interval,
                                       work / "probe-burst.txt") as during:
                        t0 = time.monotonic()
                        cpu0, own0 = cpu_sec(process.pid), own_cpu_sec()
                        for agent in burst:
                            agents.start_soon(agent.run, handshakes)
                        with trio.fail_after(args.timeout):
                            for agent in burst:
                                await agent.wait_attested()
                        t_last = max(a.attested_at for a in burst)
                        cpu1, own1 = cpu_sec(process.pid), own_cpu_sec()
                        # the server's own view agrees: N+1 tunnels, N+1 apps allowed
                        for _ in range(120):
                            seen = await admitted_counts(client, base)
                            if seen == (n + 1, n + 1):
                                break
                            await trio.sleep(0.5)
                        else:
                            raise RuntimeError(f"server counts {seen}, expected {(n + 1, n + 1)}")
                    figures["admit_all_sec"] = t_last - t0
                    figures["admit_rate_per_sec"] = n / (t_last - t0)
                    figures["eecp_cpu_burst_sec"] = cpu1 - cpu0
                    figures["bench_cpu_burst_sec"] = own1 - own0
                    waited = [a.attested_at - a.started for a in burst]
                    figures["admit_latency_p50_sec"] = percentile(waited, 50)
                    figures["admit_latency_p99_sec"] = percentile(waited, 99)
                    served = [a.attested_at - a.connected_at for a in burst]
                    figures["register_to_attested_p50_sec"] = percentile(served, 50)
                    figures["register_to_attested_p99_sec"] = percentile(served, 99)
                    in_burst = during.until(t_last).since(t0)
                    figures["resolve_during_burst"] = in_burst.summary()

                    await trio.sleep(args.settle)  # idle tunnels (pings every 10 s)
                    figures["rss_after_kib"] = rss_kib(process.pid)
                    figures["rss_peak_kib"] = rss_kib(process.pid, "VmHWM")
                    delta = figures["rss_after_kib"] - figures["rss_before_kib"]
                    figures["rss_per_tunnel_kib"] = delta / n
                    async with probing(canary_url, 0, work / "probe-idle.txt",
                                       count=args.resolves) as idle:
                        pass
                    figures["resolve_idle"] = idle.summary()
                    figures["connected_apps"] = await admitted_counts(client, base)
                    problems = [a for a in [canary, *burst] if a.error or a.closed]
                    figures["agent_problems"] = len(problems)
                    for agent in problems[:5]:
                        print(f"  agent {agent.app}: error={agent.error} closed={agent.closed}")
                    if during.failures or idle.failures:
                        print("  resolve failures:", (during.failures + idle.failures)[:5])
                    agents.cancel_scope.cancel()
    return figures


def report(args: argparse.Namespace, f: dict[str, Any]) -> str:
    mib = 1024.0
    return "\n".join([
        f"eecp tunnel bench: {f['agents']} agents (python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, fd limit {f['fd_limit']}, "
        f"EE_VERIFY_WORKERS {f['verify_workers']}, EE_STORE_WORKERS {f['store_workers']}, "
        f"GIL switch interval {f['switch_interval']}, "
        f"connect concurrency {args.connect_concurrency})",
        f"  admission: all {f['agents']} attested in {f['admit_all_sec']:.2f} s "
        f"= {f['admit_rate_per_sec']:.0f} agents/s",
        f"    per agent, burst start -> attested (queueing for a handshake slot included): "
        f"p50 {f['admit_latency_p50_sec']:.2f} s, p99 {f['admit_latency_p99_sec']:.2f} s",
        f"    per agent, WebSocket open -> attested: "
        f"p50 {f['register_to_attested_p50_sec']:.2f} s, "
        f"p99 {f['register_to_attested_p99_sec']:.2f} s",
        f"    CPU during the burst: eecp {f['eecp_cpu_burst_sec']:.2f} s "
        f"({f['eecp_cpu_burst_sec'] / f['agents'] * 1000:.1f} ms per admission, "
        f"{f['eecp_cpu_burst_sec'] / f['admit_all_sec'] * 100:.0f} % of one core), "
        f"bench {f['bench_cpu_burst_sec']:.2f} s "
        f"({f['bench_cpu_burst_sec'] / f['admit_all_sec'] * 100:.0f} % of one core)",
        f"  resolve during the burst (every {args.resolve_interval * 1000:.0f} ms): "
        f"{f['resolve_during_burst']}",
        f"  resolve with {f['agents'] + 1} idle tunnels (back to back): {f['resolve_idle']}",
        f"  eecp RSS: {f['rss_start_kib'] / mib:.1f} MiB at start, "
        f"{f['rss_before_kib'] / mib:.1f} MiB after warm-up (1 tunnel), "
        f"{f['rss_after_kib'] / mib:.1f} MiB with {f['agents'] + 1} idle tunnels "
        f"(peak {f['rss_peak_kib'] / mib:.1f} MiB)",
        f"  RSS per tunnel: {f['rss_per_tunnel_kib']:.1f} KiB "
        f"(({f['rss_after_kib']} - {f['rss_before_kib']}) KiB / {f['agents']})",
        f"  server view at the end (tunnels, apps allowed): {f['connected_apps']}; "
        f"agents with errors: {f['agent_problems']}",
        f"  eecp log: {f['eecp_log']}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500, help="agents to admit (500)")
    parser.add_argument("--connect-concurrency", type=int, default=100,
                        help="WebSocket handshakes in flight at once (100, hypercorn's backlog)")
    parser.add_argument("--verify-workers", type=int, default=0,
                        help="EE_VERIFY_WORKERS for eecp (default: eecp's own)")
    parser.add_argument("--store-workers", type=int, default=0,
                        help="EE_STORE_WORKERS for eecp (default: eecp's own)")
    parser.add_argument("--resolve-interval", type=float, default=0.01,
                        help="seconds between resolves during the burst (0.01)")
    parser.add_argument("--resolves", type=int, default=300,
                        help="resolves timed with the tunnels idle (300)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds idle before reading RSS after the burst (5)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up if not all admitted after this many seconds (600)")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="experiment: sys.setswitchinterval() for eecp (Python's 0.005)")
    parser.add_argument("--log-level", default="INFO", help="EE_LOG_LEVEL for eecp (INFO)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (database, eecp log)")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # internal
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    if args.probe:
        probe_main(args.probe, args.resolve_interval, args.resolves)
        return
    figures = trio.run(bench, args)
    print(report(args, figures))
    if args.json:
        print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Data-plane bench: requests through eecp's proxy listener, over a real agent's tunnel, to a
fast local backend, loaded with ``wrk``. Run by hand from the repository root::

    python bench/proxy.py [--duration 10] [--json] [--skip-tunnels] [--profile DIR]

What runs where (all on loopback, every piece a process of its own):

* the backend: this file with ``--backend PORT``, an asyncio + httptools HTTP/1.1 server
  (keep-alive) answering ``/small`` (100-byte body), ``/big`` (1 MiB), ``/slow`` (100 bytes
  after 2 s), ``/health`` and ``/stats`` (connections and requests it has seen);
* eecp: ``python -m eecp serve`` (SQLite in a temp dir, the allowlist from ``EE_ALLOWLIST_DIR``,
  a fresh development PKI's root as ``EE_DCAP_ROOT_CA``), control, proxy and auth ports free
  loopback ports;
* the real agent (``python agent/agent.py``, ``--agents`` of them, app ``bench``) with the
  ``dev`` quote provider minting under that PKI (``EE_DEV_PKI_DIR``); the allowlist holds the
  measurements :func:`agent.measure.measure` computes for exactly that agent configuration, so
  the agent attests for real;
* the stand-in PCCS (``tests.fake_pccs``) serving the PKI's collateral, in this process (it is
  only asked once, when the first quote is verified);
* ``wrk`` (``apt-get install -y wrk``), the load, with ``--latency`` for p50/p99.

The runs, in this order, each ``--duration`` seconds: a) ``/small`` through the proxy listener
(``Host: bench.app.example.com``) at concurrency 1, 16 and 64, b) each followed by the backend
hit directly (the ceiling); c) ``/big`` (1 MiB) at c=16 through the proxy and directly; d)
``GET /v1/resolve/bench`` on the auth listener and on the control port (hypercorn) at c=64;
e) ``/small`` at c=8 alone, then again while ``--slow-connections`` connections keep ``/slow``
requests (2 s each) in flight on the same agent; f) RSS per idle tunnel, which is
``bench/tunnels.py``'s measurement: it runs after the rest, as its own subprocess
(``--tunnel-agents``, 1000 by default; ``--skip-tunnels`` skips it). Each run prints the CPU
that eecp, the agent(s), the backend and wrk used during it (% of one core; "queued": time
runnable but waiting for a CPU, from schedstat; "others": every other process on the machine),
the CPU milliseconds per request of eecp and the agent (the figure least disturbed by a busy
machine), and how many TCP connections the backend accepted (more than wrk's concurrency means
the agent's backend pool is opening a connection per request).

``--profile DIR`` adds one more proxied ``/small`` run at c=64 (``--profile-path /big``: ``/big``
at c=16) with ``py-spy record`` (raw
collapsed stacks) attached to eecp, the first agent and the backend, and prints their top
functions; it is separate from the measured runs, so the sampling does not touch their figures.

Every figure printed was measured in this run; compare within one run only (on a small machine
wrk, eecp, the agent and the backend share the cores).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/proxy.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# ---- the backend (``--backend PORT``): stdlib asyncio + httptools, imported lazily ----------

SMALL_BODY = (b"eecp bench small response " * 4)[:99] + b"\n"  # 100 bytes
BIG_BODY = bytes(range(256)) * 4096  # 1 MiB
SLOW_SEC = 2.0


def _response(status: str, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def serve_backend(port: int) -> None:
    """The backend: one asyncio thread; responses leave in request order on each connection."""
    import asyncio

    import httptools

    responses = {b"/small": _response("200 OK", SMALL_BODY),
                 b"/big": _response("200 OK", BIG_BODY, b"application/octet-stream"),
                 b"/health": _response("200 OK", b"ok\n")}
    not_found = _response("404 Not Found", b"not found\n")
    stats = {"connections": 0, "requests": 0}

    class Connection(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            # answers in request order (a pipelining client must get them in order)
            self.pending: list[list[Any]] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            stats["connections"] += 1

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                if self.transport is not None:
                    self.transport.close()

        def on_message_begin(self) -> None:
            self.url = b""

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            stats["requests"] += 1
            path = self.url.split(b"?", 1)[0]
            slot: list[Any] = [None, self.parser.should_keep_alive()]
            self.pending.append(slot)
            if path == b"/slow":
                asyncio.get_running_loop().call_later(SLOW_SEC, self._answer, slot,
                                                      responses[b"/small"])
            elif path == b"/stats":
                self._answer(slot, _response("200 OK", json.dumps(stats).encode(),
                                             b"application/json"))
            else:
                self._answer(slot, responses.get(path, not_found))

        def _answer(self, slot: list[Any], data: bytes) -> None:
            slot[0] = data
            transport = self.transport
            while self.pending and self.pending[0][0] is not None:
                ready, keep_alive = self.pending.pop(0)
                if transport is None or transport.is_closing():
                    continue
                transport.write(ready)
                if not keep_alive:
                    transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.transport = None

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            Connection, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    asyncio.run(main())


if __name__ == "__main__" and sys.argv[1:2] == ["--backend"]:  # the backend stays lean
    serve_backend(int(sys.argv[2]))
    sys.exit(0)

# ---- everything else needs the project ------------------------------------------------------

import httpx  # noqa: E402
import trio  # noqa: E402

from agent.config import from_env as agent_config  # noqa: E402
from agent.measure import measure  # noqa: E402
from bench.tunnels import free_port, raise_fd_limit, rss_kib, wait_serving  # noqa: E402
from eecp.dev import mint as devmint  # noqa: E402
from eecp.dev import pki as devpki  # noqa: E402
from tests.fake_pccs import open_fake_pccs  # noqa: E402
from tests.harness import REPO, TAG, allowlist_doc  # noqa: E402

APP = "bench"
HOST = f"{APP}.app.example.com"
NETWORK = "forge-1"  # sealed: the agent runs with SEAL_VM=true
ADMIN_TOKEN = "bench-admin"
MIB = 1024 * 1024

#: the issue's targets
TARGET_AUTH_RPS = 25_000.0
TARGET_PROXY_RPS = 4_000.0
TARGET_PROXY_P99_MS = 25.0
TARGET_BIG_MBPS = 300.0
TARGET_TUNNEL_KIB = 24.0
TARGET_MIXED_RATIO = 2.0


# ---- subprocesses ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _child_setup() -> None:
    """In the child, before exec: die (SIGTERM) when the bench dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, chars: int = 3000) -> str:
        with suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


class Children:
    """The bench's long-running subprocesses; :meth:`stop_all` stops them newest first
    (agents, then eecp, then the backend), SIGTERM and then SIGKILL."""

    def __init__(self) -> None:
        self.running: list[Child] = []

    def spawn(self, name: str, command: Sequence[str], env: dict[str, str], log: Path
              ) -> Child:
        with log.open("wb") as out:
            # own process group: a Ctrl-C reaches only the bench, which stops them in order
            process = subprocess.Popen(list(command), cwd=REPO_ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, process_group=0,
                                       preexec_fn=_child_setup)
        child = Child(name, process, log)
        self.running.append(child)
        return child

    def stop_all(self, timeout: float = 15.0) -> None:
        while self.running:
            child = self.running.pop()
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()


async def wait_listening(port: int, child: Child, seconds: float = 30.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port``."""
    for _ in range(int(seconds / 0.05)):
        if child.process.poll() is not None:
            break
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return
    raise SystemExit(f"{child.name} did not listen on {port} (exit {child.process.poll()}):\n"
                     f"{child.tail()}")


# ---- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _size_bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)([KMGT]?B)", text)
    if match is None:
        raise ValueError(f"unreadable size {text!r}")
    return float(match.group(1)) * _SIZES[match.group(2)]


@dataclass
class Run:
    """One wrk run, as wrk reported it, plus the CPU each process used meanwhile."""

    label: str
    url: str
    connections: int
    seconds: float = 0.0
    requests: int = 0
    rps: float = 0.0
    read_bytes: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50", "75", "90", "99"
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    cpu_pct: dict[str, float] = field(default_factory=dict)  # % of one core
    #: % of the run each process was runnable but waiting for a CPU (a busy machine)
    wait_pct: dict[str, float] = field(default_factory=dict)
    other_pct: float = 0.0  # CPU used by processes that are not part of the bench
    backend_connections: int | None = None

    @property
    def p50(self) -> float:
        return self.latency_ms.get("50", float("nan"))

    @property
    def p99(self) -> float:
        return self.latency_ms.get("99", float("nan"))

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def mib_per_sec(self, body: int) -> float:
        return self.rps * body / MIB

    def summary(self) -> str:
        text = (f"{self.rps:9.0f} req/s  p50 {self.p50:7.2f} ms  p99 {self.p99:7.2f} ms")
        if self.errors:
            text += f"  ERRORS non-2xx={self.non_2xx} socket={self.socket_errors}"
        return text

    def cpu_ms_per_request(self, name: str) -> float:
        """CPU milliseconds ``name`` spent per request wrk completed."""
        if not self.requests or not self.seconds:
            return float("nan")
        return self.cpu_pct.get(name, 0.0) / 100 * self.seconds * 1000 / self.requests

    def cpu_summary(self) -> str:
        parts = []
        for name, pct in self.cpu_pct.items():
            wait = self.wait_pct.get(name, 0.0)
            parts.append(f"{name} {max(0.0, pct):.0f}%"
                         + (f" (+{wait:.0f}% queued)" if wait >= 5 else ""))
        line = "cpu " + ", ".join(parts) + f", others {self.other_pct:.0f}%"
        per = [f"{name} {self.cpu_ms_per_request(name):.3f} ms" for name in ("eecp", "agent")
               if self.cpu_pct.get(name, 0.0) > 1 and self.requests]
        if per:
            line += "; per request " + ", ".join(per)
        if self.backend_connections is not None:
            line += f"; backend accepted {self.backend_connections} connections"
        return line


def parse_wrk(out: str, run: Run) -> Run:
    """Fill ``run`` from wrk's text output (``--latency``)."""
    total = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+[KMGT]?B) read", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if total is None or rate is None:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    run.requests = int(total.group(1))
    run.seconds = _latency_ms(total.group(2)) / 1000
    run.read_bytes = _size_bytes(total.group(3))
    run.rps = float(rate.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.MULTILINE):
        run.latency_ms[pct] = _latency_ms(value)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    if errors:
        run.socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                                     map(int, errors.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    run.non_2xx = int(non_2xx.group(1)) if non_2xx else 0
    return run


def wrk_command(url: str, connections: int, seconds: float, threads: int,
                host: str | None = None, timeout: float = 10.0) -> list[str]:
    command = ["wrk", f"-t{max(1, min(threads, connections))}", f"-c{connections}",
               f"-d{max(1, round(seconds))}s", "--latency", f"--timeout={timeout:g}s"]
    if host:
        command += ["-H", f"Host: {host}"]
    return [*command, url]


# ---- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """The running processes and their addresses."""

    work: Path
    children: Children
    eecp: Child
    agents: list[Child]
    backend: Child
    backend_url: str
    control_url: str
    proxy_url: str
    auth_url: str
    args: argparse.Namespace
    stats_client: httpx.AsyncClient | None = None

    def pids(self) -> dict[str, list[int]]:
        return {"eecp": [self.eecp.pid], "agent": [a.pid for a in self.agents],
                "backend": [self.backend.pid]}

    def check_alive(self) -> None:
        for child in [self.eecp, *self.agents, self.backend]:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited ({child.process.returncode}):\n"
                                   f"{child.tail()}")

    async def backend_connections(self) -> int:
        assert self.stats_client is not None
        stats = (await self.stats_client.get(self.backend_url + "/stats")).json()
        return int(stats["connections"])

    async def streams_in_flight(self) -> float:
        text = (await self.stats_client.get(self.control_url + "/metrics")).text \
            if self.stats_client else ""
        match = re.search(r"^eecp_streams_in_flight(?:\{[^}]*\})? ([\d.e+-]+)$", text,
                          re.MULTILINE)
        return float(match.group(1)) if match else float("nan")

    async def wrk(self, label: str, url: str, connections: int, *, host: str | None = None,
                  seconds: float | None = None, wrk_timeout: float = 10.0,
                  settle: bool = True) -> Run:
        """One wrk run against ``url``, with each process's CPU share during it."""
        self.check_alive()
        seconds = self.args.duration if seconds is None else seconds
        run = Run(label, url, connections)
        command = wrk_command(url, connections, seconds, self.args.threads, host, wrk_timeout)
        conns0 = await self.backend_connections()
        with cpu_meter(self.pids(), run):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                          check=False)
        run.backend_connections = await self.backend_connections() - conns0
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.decode()}")
        parse_wrk(done.stdout.decode(), run)
        if settle:
            await self.settle()
        return run

    async def settle(self, seconds: float = 10.0) -> None:
        """Until eecp has no proxied request in flight (a leak would show here)."""
        deadline = trio.current_time() + seconds
        while (left := await self.streams_in_flight()) > 0:
            if trio.current_time() > deadline:
                print(f"  WARNING: eecp still reports {left:.0f} streams in flight "
                      f"{seconds:.0f} s after the run")
                return
            await trio.sleep(0.1)


def sched_sec(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of all of ``pid``'s threads,
    from /proc/<pid>/task/*/schedstat."""
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError, ValueError):  # a thread that just ended
            on_cpu, queued, _ = (task / "schedstat").read_text().split()
            ran += int(on_cpu)
            waited += int(queued)
    return ran / 1e9, waited / 1e9


def machine_busy_sec() -> float:
    """CPU seconds all processes used so far, from /proc/stat (idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_meter(pids: dict[str, list[int]], run: Run) -> Iterator[None]:
    """CPU used by each named process group (and by wrk, a reaped child), the time they waited
    for a CPU, and what everything else on the machine used, during the block."""
    def sample() -> tuple[dict[str, float], dict[str, float], float]:
        ran: dict[str, float] = {}
        waited: dict[str, float] = {}
        for name, group in pids.items():
            times = [sched_sec(pid) for pid in group]
            ran[name] = sum(t[0] for t in times)
            waited[name] = sum(t[1] for t in times) / max(1, len(group))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ran["wrk"] = children.ru_utime + children.ru_stime
        return ran, waited, machine_busy_sec()

    (ran0, wait0, busy0), t0 = sample(), time.monotonic()
    yield
    (ran1, wait1, busy1), wall = sample(), time.monotonic() - t0
    run.cpu_pct = {name: 100 * (ran1[name] - ran0[name]) / wall for name in ran0}
    run.wait_pct = {name: 100 * (wait1[name] - wait0[name]) / wall for name in wait0}
    ours = sum(ran1[name] - ran0[name] for name in ran0)
    run.other_pct = max(0.0, 100 * ((busy1 - busy0) - ours) / wall)


def agent_env(args: argparse.Namespace, work: Path, control_port: int, backend_url: str
              ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EE_")}
    env.pop("VM_IMAGE_ID", None)
    env.pop("SEAL_VM", None)
    env.update({
        "PYTHONPATH": str(REPO_ROOT),
        "EE_CONTROL_WS": f"ws://127.0.0.1:{control_port}/v1/tunnel",
        "EE_REPO": REPO, "EE_RELEASE_TAG": TAG, "EE_APP_NAME": APP, "EE_NETWORK": NETWORK,
        "EE_BACKEND_URL": backend_url,
        "EE_QUOTE_PROVIDER": "dev", "EE_DEV_PKI_DIR": str(work / "dev-pki"),
        "VM_IMAGE_ID": "bench-vm", "SEAL_VM": "true",
        "EE_MAX_STREAMS": str(args.max_streams),
        "EE_LOG_LEVEL": args.log_level,
    })
    return env


def write_allowlist(directory: Path, env: dict[str, str]) -> None:
    """``<dir>/<owner>/<repo>/<tag>.json`` holding the measurements the agent will report:
    computed by the agent's own code from the agent's own configuration."""
    measurements = measure(agent_config(env))
    owner, name = REPO.split("/")
    path = directory / owner / name / f"{TAG}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(allowlist_doc(measurements))


async def wait_attested(stack: Stack, seconds: float = 60.0) -> None:
    """Until every agent has logged ``eecp: ok attested`` and resolve allows the app."""
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(int(seconds / 0.1)):
            stack.check_alive()
            logs = [a.tail(200_000) for a in stack.agents]
            for agent, text in zip(stack.agents, logs, strict=True):
                if "eecp: invalid" in text:
                    raise SystemExit(f"{agent.name} was refused:\n{agent.tail()}\n"
                                     f"eecp log:\n{stack.eecp.tail()}")
            if all("eecp: ok attested" in text for text in logs):
                answer = await client.get(f"{stack.control_url}/v1/resolve/{APP}")
                body = answer.json()
                if answer.status_code == 200 and body.get("agents") == len(stack.agents):
                    return
            await trio.sleep(0.1)
    raise SystemExit(f"agents not attested within {seconds:.0f} s:\n{stack.agents[0].tail()}"
                     f"\neecp log:\n{stack.eecp.tail()}")


@asynccontextmanager
async def open_stack(args: argparse.Namespace, work: Path) -> AsyncIterator[Stack]:
    """Backend, PCCS, eecp and the agents; everything stopped when the block ends."""
    pki_dir = work / "dev-pki"
    pki = devpki.ensure_pki(pki_dir)
    baseline = devmint.mint_tdx_quote(pki, now=time.time(), collateral_days=30)
    children = Children()
    with ExitStack() as cleanup:
        cleanup.callback(children.stop_all)
        backend_port = free_port()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("EE_")}
        base_env["PYTHONPATH"] = str(REPO_ROOT)
        backend = children.spawn("backend", [sys.executable, __file__, "--backend",
                                             str(backend_port)], base_env, work / "backend.log")
        backend_url = f"http://127.0.0.1:{backend_port}"
        async with open_fake_pccs(baseline.collateral_json) as pccs:
            control, proxy, auth = free_port(), free_port(), free_port()
            agents_env = agent_env(args, work, control, backend_url)
            write_allowlist(work / "allowlists", agents_env)
            env = dict(base_env)
            env.update({
                "EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": str(control),
                "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": str(proxy),
                "EE_AUTH_BIND": "127.0.0.1", "EE_AUTH_PORT": str(auth),
                "EE_DB_PATH": str(work / "eecp.db"),
                "EE_DCAP_ROOT_CA": str(pki_dir / devpki.ROOT_CERT_FILE),
                "EE_PCCS_URL": pccs.url,
                "EE_ALLOWLIST_DIR": str(work / "allowlists"),
                "EE_GITHUB_API_URL": "http://127.0.0.1:9",  # never asked: the file answers
                "EE_ADMIN_TOKEN": ADMIN_TOKEN, "EE_LOG_LEVEL": args.log_level,
                "EE_TUNNEL_MAX_STREAMS": str(args.max_streams),
                "EE_PROXY_TIMEOUT_SEC": str(args.proxy_timeout),
                "EE_STREAM_WINDOW_BYTES": str(args.stream_window),
                **({"EE_ACCESS_LOG": args.access_log} if args.access_log else {}),
            })
            eecp = children.spawn("eecp", [sys.executable, "-m", "eecp", "serve"], env,
                                  work / "eecp.log")
            await wait_listening(backend_port, backend)
            control_url = f"http://127.0.0.1:{control}"
            await wait_serving(eecp.process, control_url, eecp.log)
            for port in (proxy, auth):
                await wait_listening(port, eecp)
            agents = [children.spawn(f"agent-{i}", [sys.executable, "agent/agent.py"],
                                     agents_env, work / f"agent-{i}.log")
                      for i in range(args.agents)]
            stack = Stack(work, children, eecp, agents, backend, backend_url, control_url,
                          f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{auth}", args)
            await wait_attested(stack)
            limits = httpx.Limits(keepalive_expiry=3600)  # one connection to count with
            async with httpx.AsyncClient(timeout=30, limits=limits) as stats_client:
                stack.stats_client = stats_client
                yield stack


async def sanity_check(stack: Stack) -> dict[str, Any]:
    """One request of each kind through the proxy, checked byte for byte."""
    seen: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=30, headers={"Host": HOST}) as client:
        async def get(path: str, expect: bytes) -> None:
            t0 = time.perf_counter()
            answer = await client.get(stack.proxy_url + path)
            if answer.status_code != 200 or answer.content != expect:
                raise RuntimeError(f"proxied {path}: {answer.status_code} "
                                   f"{len(answer.content)} bytes {answer.content[:200]!r}")
            seen[path] = round(time.perf_counter() - t0, 3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "/slow", SMALL_BODY)
            nursery.start_soon(get, "/big", BIG_BODY)
            await get("/small", SMALL_BODY)
    if seen["/slow"] < SLOW_SEC:
        raise RuntimeError(f"/slow answered in {seen['/slow']} s")
    return seen


# ---- the runs -------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"runs": {}}
    runs: dict[str, Run] = {}

    def keep(key: str, run: Run) -> Run:
        runs[key] = run
        print(f"  {run.label:40} {run.summary()}", flush=True)
        return run

    async with open_stack(args, work) as stack:
        figures["sanity_seconds"] = await sanity_check(stack)
        figures["eecp_rss_kib_start"] = rss_kib(stack.eecp.pid)
        small_proxy = stack.proxy_url + "/small"
        small_direct = stack.backend_url + "/small"
        print("running (each run", f"{args.duration:g} s):", flush=True)
        # warm-up: connections, caches, the agent's backend pool
        await stack.wrk("warm-up", small_proxy, 16, host=HOST, seconds=2)
        await stack.wrk("warm-up", small_direct, 16, seconds=1)

        for c in (1, 16, 64):
            keep(f"proxy_small_c{c}", await stack.wrk(f"a) proxy /small c={c}", small_proxy,
                                                      c, host=HOST))
            keep(f"direct_small_c{c}", await stack.wrk(f"b) direct /small c={c}",
                                                       small_direct, c))
        keep("proxy_big_c16", await stack.wrk("c) proxy /big c=16", stack.proxy_url + "/big",
                                              16, host=HOST))
        keep("direct_big_c16", await stack.wrk("c) direct /big c=16",
                                               stack.backend_url + "/big", 16))
        keep("auth_resolve_c64", await stack.wrk(
            "d) auth listener resolve c=64", f"{stack.auth_url}/v1/resolve/{APP}", 64))
        keep("control_resolve_c64", await stack.wrk(
            "d) control port resolve c=64", f"{stack.control_url}/v1/resolve/{APP}", 64))

        fast = args.mixed_fast_connections
        keep("fast_alone", await stack.wrk(f"e) proxy /small c={fast} alone", small_proxy,
                                           fast, host=HOST))
        mixed, slow = await mixed_run(stack, fast)
        keep("fast_loaded", mixed)
        keep("slow_load", slow)

        if args.profile:
            figures["profile"] = await profile_run(stack, Path(args.profile))
        stack.check_alive()
        figures["eecp_rss_kib_end"] = rss_kib(stack.eecp.pid)
        figures["agent_rss_kib_end"] = [rss_kib(a.pid) for a in stack.agents]
        figures["eecp_log"] = str(stack.eecp.log)
        figures["problems"] = log_problems(stack)

    figures["runs"] = {key: {**asdict(run), "p50_ms": run.p50, "p99_ms": run.p99}
                       for key, run in runs.items()}
    figures["summary"] = summarise(runs)
    if not args.skip_tunnels:
        figures["tunnels"] = await tunnels_bench(args)
    return figures


async def mixed_run(stack: Stack, fast: int) -> tuple[Run, Run]:
    """``/slow`` kept in flight on ``--slow-connections`` connections while ``/small`` is
    measured at c=``fast``; the slow load starts first and ends after the fast run."""
    args = stack.args
    lead = SLOW_SEC + 0.5  # every slow connection has a request in flight before we measure
    slow_run = Run(f"e) proxy /slow c={args.slow_connections} (load)",
                   stack.proxy_url + "/slow", args.slow_connections)
    slow_cmd = wrk_command(slow_run.url, slow_run.connections, args.duration + lead + 1,
                           args.threads, HOST, timeout=SLOW_SEC + 8)
    results: dict[str, Run] = {}

    async def slow_load() -> None:
        done = await trio.run_process(slow_cmd, capture_stdout=True, capture_stderr=True,
                                      check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed: {done.stderr.decode()}")
        results["slow"] = parse_wrk(done.stdout.decode(), slow_run)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_load)
        await trio.sleep(lead)
        results["fast"] = await stack.wrk(
            f"e) proxy /small c={fast} + {args.slow_connections} x /slow", stack.proxy_url
            + "/small", fast, host=HOST, settle=False)
    await stack.settle()
    return results["fast"], results["slow"]


def log_problems(stack: Stack) -> list[str]:
    """Warnings, errors and tracebacks in eecp's and the agents' logs."""
    found: list[str] = []
    for child in [stack.eecp, *stack.agents]:
        for line in child.log.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line) \
                    and "EE_DCAP_ROOT_CA" not in line and "EE_QUOTE_PROVIDER=dev" not in line:
                found.append(f"{child.name}: {line[:300]}")
    return found


# ---- py-spy ---------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    """py-spy on PATH or beside this Python."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def profile_run(stack: Stack, out: Path) -> dict[str, Any]:
    """A proxied run (``--profile-path``: /small at c=64, /big at c=16) with py-spy sampling
    eecp, the first agent and the backend."""
    py_spy = find_py_spy()
    if py_spy is None:
        print("  --profile: py-spy not found (pip install py-spy); skipped")
        return {}
    targets = {"eecp": stack.eecp.pid, "agent": stack.agents[0].pid,
               "backend": stack.backend.pid}
    seconds = max(2, round(stack.args.duration))
    files = {name: out / f"{name}.txt" for name in targets}
    run: Run | None = None

    async def record(name: str) -> None:
        await trio.run_process([py_spy, "record", "--pid", str(targets[name]), "--rate", "100",
                                "--duration", str(seconds + 2), "--format", "raw",
                                "--output", str(files[name])],
                               capture_stdout=True, capture_stderr=True, check=False)

    async with trio.open_nursery() as nursery:
        for name in targets:
            nursery.start_soon(record, name)
        await trio.sleep(1)  # py-spy attached
        path = stack.args.profile_path
        concurrency = 64 if path == "/small" else 16
        run = await stack.wrk(f"profile: proxy {path} c={concurrency} (py-spy)",
                              stack.proxy_url + path, concurrency, host=HOST, seconds=seconds)
    print(f"  profile run (not a measurement): {run.summary()}; {run.cpu_summary()}")
    print("  (self time in trio's get_events / _nonblocking_helper is epoll_wait / send / recv:"
          " the syscalls, plus time runnable but not yet running after a wake-up)")
    profile: dict[str, Any] = {"dir": str(out), "cpu_pct": run.cpu_pct,
                               "wait_pct": run.wait_pct}
    for name, path in files.items():
        if not path.exists():
            print(f"  py-spy wrote nothing for {name}")
            continue
        summary = summarise_stacks(path.read_text())
        profile[name] = summary
        print(f"  {name} ({summary['samples']} samples; {path}):")
        print("    self time by package: " + ", ".join(
            f"{pkg} {pct:.0f}%" for pkg, pct in summary["packages"][:8]))
        for func, pct in summary["self"][:12]:
            print(f"    self {pct:5.1f}%  {func}")
        for func, pct in summary["inclusive"][:12]:
            print(f"    incl {pct:5.1f}%  {func}")
    return profile


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(raw: str) -> tuple[str, str]:
    """(``func (short file)``, package) of one py-spy frame."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), "other"
    func, file = match.group("func"), match.group("file")
    short = file
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            short = file.split(marker, 1)[1]
            break
    with suppress(ValueError):
        short = str(Path(file).resolve().relative_to(REPO_ROOT))
    if short.startswith((".", "/")) or ("/" not in short and short.startswith("lib")):
        short = Path(file).name
    package = short.split("/", 1)[0].removesuffix(".py") if "/" in short else "stdlib"
    if "lib/python3" in file and "site-packages" not in file:
        package = "stdlib"
    return f"{func} ({short})", package


def summarise_stacks(text: str) -> dict[str, Any]:
    """Top functions by self and inclusive samples from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1][0]] += count
        packages[frames[-1][1]] += count
        for name in {f[0] for f in frames}:
            incl[name] += count

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100 * n / total) for name, n in counter.most_common(25)] if total else []

    return {"samples": total, "self": top(own), "inclusive": top(incl),
            "packages": top(packages)}


# ---- f) RSS per idle tunnel: bench/tunnels.py ---------------------------------------------


async def tunnels_bench(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(REPO_ROOT / "bench" / "tunnels.py"), "--agents",
               str(args.tunnel_agents), "--log-level", "WARNING", "--json"]
    print(f"f) {' '.join(command[1:])} ...", flush=True)
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                  check=False, cwd=REPO_ROOT)
    out = done.stdout.decode()
    start = out.find("\n{")
    if done.returncode != 0 or start < 0:
        print(f"  bench/tunnels.py failed ({done.returncode}):\n{out[-2000:]}"
              f"{done.stderr.decode()[-2000:]}")
        return {"error": done.returncode}
    figures: dict[str, Any] = json.loads(out[start:])
    figures["report"] = out[:start].strip().splitlines()
    return figures


# ---- the report -----------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def summarise(runs: dict[str, Run]) -> dict[str, Any]:
    """The headline figures and their targets."""
    out: dict[str, Any] = {}
    for c in (1, 16, 64):
        proxy, direct = runs[f"proxy_small_c{c}"], runs[f"direct_small_c{c}"]
        out[f"small_c{c}_ratio"] = proxy.rps / direct.rps if direct.rps else 0.0
    p64 = runs["proxy_small_c64"]
    out["proxy_small_c64_ok"] = p64.rps >= TARGET_PROXY_RPS and p64.p99 <= TARGET_PROXY_P99_MS
    big, big_direct = runs["proxy_big_c16"], runs["direct_big_c16"]
    out["big_mb_per_sec"] = big.rps * MIB / 1e6
    out["big_direct_mb_per_sec"] = big_direct.rps * MIB / 1e6
    out["big_ratio"] = big.rps / big_direct.rps if big_direct.rps else 0.0
    out["big_ok"] = out["big_mb_per_sec"] >= TARGET_BIG_MBPS
    auth, control = runs["auth_resolve_c64"], runs["control_resolve_c64"]
    out["auth_over_control"] = auth.rps / control.rps if control.rps else 0.0
    out["auth_ok"] = auth.rps >= TARGET_AUTH_RPS
    alone, loaded = runs["fast_alone"], runs["fast_loaded"]
    out["mixed_p99_ratio"] = loaded.p99 / alone.p99 if alone.p99 else float("inf")
    out["mixed_ok"] = out["mixed_p99_ratio"] <= TARGET_MIXED_RATIO
    return out


def report(args: argparse.Namespace, f: dict[str, Any]) -> str:
    runs = {key: Run(**{k: v for k, v in run.items() if k in Run.__dataclass_fields__})
            for key, run in f["runs"].items()}
    s = f["summary"]
    lines = [
        f"eecp data-plane bench (python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"wrk {args.threads} thread(s), {args.duration:g} s per run, {args.agents} agent(s), "
        f"EE_TUNNEL_MAX_STREAMS {args.max_streams}, EE_PROXY_TIMEOUT_SEC {args.proxy_timeout:g})",
        f"  sanity (one request each through the proxy, seconds): {f['sanity_seconds']}",
        "a/b) /small (100-byte body): proxy listener vs the backend directly",
        "      c     proxy req/s  p50 ms  p99 ms    direct req/s  p50 ms  p99 ms   proxy/direct",
    ]
    for c in (1, 16, 64):
        p, d = runs[f"proxy_small_c{c}"], runs[f"direct_small_c{c}"]
        lines.append(f"    {c:3d}  {p.rps:14.0f} {p.p50:7.2f} {p.p99:7.2f}  {d.rps:14.0f} "
                     f"{d.p50:7.2f} {d.p99:7.2f}   {s[f'small_c{c}_ratio']:10.3f}")
    p64 = runs["proxy_small_c64"]
    lines.append(f"    target c=64: >= {TARGET_PROXY_RPS:.0f} req/s with p99 <= "
                 f"{TARGET_PROXY_P99_MS:.0f} ms -> {p64.rps:.0f} req/s, p99 {p64.p99:.2f} ms: "
                 f"{_verdict(s['proxy_small_c64_ok'])}")
    big, big_direct = runs["proxy_big_c16"], runs["direct_big_c16"]
    lines += [
        "c)  /big (1 MiB body) c=16",
        f"    proxy  {s['big_mb_per_sec']:8.0f} MB/s ({big.mib_per_sec(MIB):.0f} MiB/s, "
        f"{big.rps:.1f} req/s, p50 {big.p50:.1f} ms, p99 {big.p99:.1f} ms)",
        f"    direct {s['big_direct_mb_per_sec']:8.0f} MB/s ({big_direct.mib_per_sec(MIB):.0f} "
        f"MiB/s); proxy/direct {s['big_ratio']:.3f}",
        f"    target >= {TARGET_BIG_MBPS:.0f} MB/s: {_verdict(s['big_ok'])}",
    ]
    auth, control = runs["auth_resolve_c64"], runs["control_resolve_c64"]
    lines += [
        "d)  GET /v1/resolve/bench c=64",
        f"    auth listener (eecp.dataplane.http) {auth.summary()}",
        f"    control port (hypercorn)        {control.summary()}",
        f"    auth/control {s['auth_over_control']:.1f}x; target auth >= "
        f"{TARGET_AUTH_RPS:.0f} req/s: {_verdict(s['auth_ok'])}",
    ]
    alone, loaded, slow = runs["fast_alone"], runs["fast_loaded"], runs["slow_load"]
    expected_slow = args.slow_connections / SLOW_SEC
    lines += [
        f"e)  /small c={args.mixed_fast_connections} on the same agent, alone and with "
        f"{args.slow_connections} x /slow ({SLOW_SEC:g} s) in flight",
        f"    alone   {alone.summary()}",
        f"    loaded  {loaded.summary()}",
        f"    slow load: {slow.requests} done in {slow.seconds:.1f} s ({slow.rps:.1f} req/s, at "
        f"most {expected_slow:.0f}/s), p50 {slow.p50:.0f} ms, p99 {slow.p99:.0f} ms, "
        f"errors {slow.errors}",
        f"    fast p99 loaded/alone {s['mixed_p99_ratio']:.2f}x; target <= "
        f"{TARGET_MIXED_RATIO:g}x: {_verdict(s['mixed_ok'])}",
    ]
    tunnels = f.get("tunnels")
    if tunnels and "rss_per_tunnel_kib" in tunnels:
        per = float(tunnels["rss_per_tunnel_kib"])
        lines.append(f"f)  RSS per idle tunnel (bench/tunnels.py --agents {tunnels['agents']}): "
                     f"{per:.1f} KiB; target <= {TARGET_TUNNEL_KIB:.0f} KiB: "
                     f"{_verdict(per <= TARGET_TUNNEL_KIB)}")
        lines += [f"    | {line}" for line in tunnels.get("report", [])]
    elif tunnels:
        lines.append(f"f)  bench/tunnels.py failed: {tunnels}")
    else:
        lines.append("f)  skipped (--skip-tunnels); `python bench/tunnels.py --agents 1000` "
                     "measures RSS per idle tunnel")
    lines.append("CPU during each run (% of one core):")
    for run in runs.values():
        if run.cpu_pct:
            lines.append(f"    {run.label:42} {run.cpu_summary()}")
    lines.append(f"eecp RSS {f['eecp_rss_kib_start'] / 1024:.1f} MiB after start-up, "
                 f"{f['eecp_rss_kib_end'] / 1024:.1f} MiB at the end; agent RSS "
                 + ", ".join(f"{k / 1024:.1f} MiB" for k in f["agent_rss_kib_end"]))
    problems = f.get("problems") or []
    lines.append(f"warnings/errors in the eecp and agent logs: {len(problems)}")
    lines += [f"    {line}" for line in problems[:10]]
    lines.append(f"logs: {f['eecp_log_kept']}")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(1024)
    work = Path(tempfile.mkdtemp(prefix="eecp-proxy-bench-"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
            figures = await run_bench(args, work)
            nursery.cancel_scope.cancel()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures["eecp_log_kept"] = str(work) if args.keep else "(temp dir removed; --keep keeps it)"
    return figures


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            print(f"{signal.Signals(signum).name}: stopping", file=sys.stderr)
            raise KeyboardInterrupt


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, possibly inside (nested) exception groups with cancellations."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        return bool(leaves) and all(_interrupted(e) for e in leaves)
    return isinstance(exc, KeyboardInterrupt)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per wrk run (10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk threads (1: leaves the cores to what is measured)")
    parser.add_argument("--agents", type=int, default=1, help="agent processes for the app (1)")
    parser.add_argument("--max-streams", type=int, default=100,
                        help="EE_TUNNEL_MAX_STREAMS for eecp and EE_MAX_STREAMS for the agents")
    parser.add_argument("--proxy-timeout", type=float, default=60.0,
                        help="EE_PROXY_TIMEOUT_SEC for eecp (60)")
    parser.add_argument("--stream-window", type=int, default=256 * 1024,
                        help="EE_STREAM_WINDOW_BYTES for eecp (262144)")
    parser.add_argument("--slow-connections", type=int, default=32,
                        help="connections keeping /slow in flight in the mixed run (32)")
    parser.add_argument("--mixed-fast-connections", type=int, default=8,
                        help="concurrency of the fast requests in the mixed run (8)")
    parser.add_argument("--access-log", choices=("on", "off"), default=None,
                        help="EE_ACCESS_LOG for eecp (its default, on, when not given)")
    parser.add_argument("--skip-tunnels", action="store_true",
                        help="skip f), bench/tunnels.py (RSS per idle tunnel)")
    parser.add_argument("--tunnel-agents", type=int, default=1000,
                        help="agents for bench/tunnels.py in f) (1000)")
    parser.add_argument("--profile", metavar="DIR",
                        help="one more run with py-spy on eecp, agent and backend; raw stacks "
                             "written to DIR")
    parser.add_argument("--profile-path", choices=("/small", "/big"), default="/small",
                        help="what the --profile run loads: /small at c=64 (default) or /big "
                        "(1 MiB) at c=16")
    parser.add_argument("--log-level", default="INFO", help="EE_LOG_LEVEL (INFO)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, db)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    in_flight = args.slow_connections + args.mixed_fast_connections
    if in_flight > args.max_streams * args.agents:
        print(f"note: the mixed run keeps {in_flight} requests in flight, more than "
              f"{args.agents} x EE_TUNNEL_MAX_STREAMS {args.max_streams}: the excess waits "
              f"(then 503 agent_busy)", file=sys.stderr)
    if args.proxy_timeout <= SLOW_SEC:
        print(f"note: EE_PROXY_TIMEOUT_SEC {args.proxy_timeout:g} <= {SLOW_SEC:g} s: /slow "
              "will time out (504)", file=sys.stderr)
    try:
        figures = trio.run(bench, args)
    except BaseException as exc:
        if _interrupted(exc):
            raise SystemExit("interrupted; subprocesses stopped") from None
        raise
    print(report(args, figures))
    if args.json:
        print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()

"""``eecp demo``: the whole path on one machine, in one process, until Ctrl-C.

A first run for a newcomer with no TDX hardware: a development PKI stands in for Intel, the
agent's ``dev`` quote provider stands in for the TDX module, and everything else is the real
code — eecp's ``serve()`` on SQLite, the real agent (``agent.tunnel.run_agent``) attesting over
its tunnel, quotes verified by dcap-qvl against collateral fetched from a PCCS, the allowlist
read from ``EE_ALLOWLIST_DIR``, proxied requests carried over the tunnel to a small backend::

    serve_demo(settings)
      outer nursery                         outlives eecp and the agent
        ├─ signals                          SIGINT/SIGTERM → shutdown
        ├─ dev PCCS (eecp.devpccs)          127.0.0.1:<free port>, the dev PKI's collateral
        ├─ backend (hello app)              127.0.0.1:<free port>: /, /health, /echo, /events
        └─ inner nursery                    ends when both have stopped on shutdown
             ├─ eecp serve()                control, proxy and auth ports (loopback only)
             └─ agent run_agent()           app ``hello`` of ``demo/hello@v0.1.0`` on sandbox-1

Everything the demo writes (dev PKI, SQLite database, allowlist, agent id) lives in one
directory, ``data/demo`` by default, so a second run reuses it. **Development only**: eecp trusts
the dev PKI's root (``EE_DCAP_ROOT_CA``) and the admin endpoints are open (with ``--ledger``
they take the demo's admin token).

``eecp demo --ledger`` runs the same with the USD ledger on (:class:`DemoLedger`): an admin
token made on the first run (``admin-token`` in the directory, printed: a demo's, never a
deployment's), 60-second periods so that a settlement comes within two minutes, a node
``demo-node`` priced, funded and staked, a user ``alice`` with $10 of credits, and the agent
naming the node (``EE_NODE_ID``) on its dev platform, whose PPID the demo confirms for the node
once the agent's attestation has left the claim. All of it through eecp's own HTTP API, as an
operator would do it, and idempotent: a second run replays it (a stake a slash reduced is
topped back up to $5). It then prints the
curl commands that report usage and show it settle, and those that show the node's stake.

The node is **premium** at a tiny price ($0.002 per vCPU-hour, 1 vCPU), so that its penalty
(720 h of list revenue: $1.44, also its minimum stake) is small and its allowance (25.92 s of
counted downtime per 30 days) short enough to break on purpose: ``--slash`` stops the agent
once it is set up, for :data:`OUTAGE_SEC` (30 s), then starts it again. The settler then
slashes the node $1.44 (``GET /v1/nodes/demo-node`` lists it under ``slashes``), within about
three minutes. The demo's ledger gives price increases no notice (a directory made by an older
demo, with another price and tier, takes the demo's terms at the next minute) and allows one
availability slash per :data:`SLASH_INTERVAL_SEC` (5 minutes instead of a day), so a second
``--slash`` a few minutes later is a second slash.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from agent.agent import build_provider
from agent.config import AgentConfig
from agent.config import from_env as agent_from_env
from agent.measure import measure
from agent.providers import DevQuoteProvider
from agent.tunnel import AgentState, run_agent
from eecp.core.config import from_env
from eecp.core.errors import EecpError
from eecp.dataplane.http import Request, Responder, serve_http
from eecp.dev import pki as devpki
from eecp.dev.pccs import DevPccs
from eecp.service import Bound, serve, watch_signals
from eecp.wire.measurements import Measurements

log = logging.getLogger("eecp.demo")

REPO, TAG, APP, NETWORK = "demo/hello", "v0.1.0", "hello", "sandbox-1"
#: how long the agent has to connect and be attested before the demo gives up
ATTEST_WITHIN_SEC = 60.0
#: the ledger's demo: the node, the user, and the 60-second period (the shortest, §21.10)
NODE, USER, PERIOD_SEC = "demo-node", "alice", 60
#: the node's terms and stake: premium, so that a 30-second outage is over its allowance, at a
#: price that makes its penalty (= its minimum stake) 720 h x $0.002 x 1 vCPU = $1.44
PRICE_USD, CAPACITY_VCPUS, TIER, STAKE_USD = "0.002", 1, "premium", "5"
PENALTY_MICROS = 1_440_000
#: the outage ``--slash`` causes (premium allows 25.92 s per 30 days)
OUTAGE_SEC = 30.0
#: the demo's EE_SLASH_MIN_INTERVAL_SEC: a second ``--slash`` minutes later slashes again
SLASH_INTERVAL_SEC = 300
ADMIN_TOKEN_FILE = "admin-token"
HELLO = b"hello from inside the TD (eecp demo backend)\n"
#: the usage the printed command reports: 1 vCPU for 0.6 of a 60-second period
USAGE_VCPU_HOURS, USAGE_USD = "0.01", "$0.00002"


class DemoError(EecpError):
    """The demo could not run: ``demo_not_attested`` (the agent was not attested in time),
    ``demo_stopped``, ``demo_ledger_setup``, ``demo_dir_unusable`` (a ``--dir`` it cannot
    write in)."""


@dataclass(frozen=True)
class DemoSettings:
    """Where the demo keeps its files and which loopback ports it serves on (0: any free)."""

    directory: Path = Path("data/demo")
    control_port: int = 8088
    proxy_port: int = 9090
    auth_port: int = 8089
    log_format: str = "text"
    log_level: str = "INFO"
    #: run with the USD ledger on (``eecp demo --ledger``)
    ledger: bool = False
    #: with the ledger: stop the agent once it is set up, ``outage_sec`` long (``--slash``)
    slash: bool = False
    outage_sec: float = OUTAGE_SEC


@dataclass(frozen=True)
class DemoLedger:
    """The ledger's side of a demo: the admin token (demo only) and the platform bound."""

    admin_token: str = field(repr=False)
    ppid: str
    node: str = NODE
    user: str = USER


@dataclass(frozen=True)
class DemoUrls:
    """What a running demo reports: where to point curl."""

    bound: Bound
    app: str = APP
    ledger: DemoLedger | None = None
    #: the demo cuts its agent's tunnel for this long once it has printed this (``--slash``)
    outage_sec: float | None = None

    @property
    def control(self) -> str:
        return self.bound.control_url

    @property
    def proxy(self) -> str:
        """The proxy listener, reached through ``<app>.localhost`` (resolves to loopback)."""
        return f"http://{self.app}.localhost:{self.bound.proxy_port}"

    @property
    def auth(self) -> str:
        return f"http://127.0.0.1:{self.bound.auth_port}"

    def lines(self) -> list[str]:
        """The commands to try, one per line, for the terminal."""
        admin = ' -H "Authorization: Bearer $T"' if self.ledger is not None else ""
        token = ([(f"export T={self.ledger.admin_token}", "the admin token (demo only)")]
                 if self.ledger is not None else [])
        tries = [
            *token,
            (f"curl -i {self.control}/v1/resolve/{self.app}", "may it be served?"),
            (f"curl -i {self.auth}/v1/resolve/{self.app}", "the same, on the auth listener"),
            (f"curl {self.proxy}/", "proxied over the agent's tunnel"),
            (f"curl -N {self.proxy}/events", "a streamed (SSE) answer"),
            (f"curl -d '{{\"path\":\"/\"}}' {self.control}/v1/proxy/{self.app}",
             "one request as JSON"),
            (f"curl{admin} {self.control}/v1/apps/{self.app}", "admin view with the audit log"),
            (f"curl {self.control}/metrics", "Prometheus metrics"),
        ]
        width = max(len(command) for command, _ in tries)
        return [
            f"eecp demo: app {self.app!r} ({REPO}@{TAG} on {NETWORK}) is attested and served.",
            "Try:",
            *(f"  {command:<{width}}  # {why}" for command, why in tries),
            *self._ledger_lines(),
            "Ctrl-C stops everything.",
        ]

    def _ledger_lines(self) -> list[str]:
        """The ledger's commands: report usage for this minute, watch it settle."""
        demo = self.ledger
        if demo is None:
            return []
        url, auth = self.control, '-H "Authorization: Bearer $T"'
        usage = (f'{{"account_id":"{demo.user}","node_id":"{demo.node}",'
                 '"period":"' + "'$P'" + f'","vcpu_hours":"{USAGE_VCPU_HOURS}"}}')
        node = f"curl {auth} {url}/v1/nodes/{demo.node}"
        steps = [
            ("this minute: one 60-second period", "P=$(date -u +%Y-%m-%dT%H:%M:00Z)"),
            ("the node, its platform, its agent, its stake and slashes", node),
            (f"hold {USAGE_USD} of alice's credits for the node (0.01 vCPU-h at "
             f"${PRICE_USD})", f"curl {auth} -d '{usage}' {url}/v1/usage/report"),
            ("alice: $10 less the hold", f"curl {auth} {url}/v1/balances/{demo.user}"),
            ("in about two minutes: settled and paid (the settler runs every minute)",
             f'curl {auth} "{url}/v1/settlements/$P?node_id={demo.node}"'),
            ("then the node's payout", f"curl {auth} {url}/v1/balances/node:{demo.node}"),
            (f"its stake: ${STAKE_USD} posted; premium's penalty, and minimum, is "
             f"720 h x ${PRICE_USD} x {CAPACITY_VCPUS} vCPU = $1.44",
             f"curl {auth} {url}/v1/balances/stake:{demo.node}"),
            *self._slash_steps(node, f"curl {auth} {url}/v1/balances/slash:platform"),
            ("and the books balance", f"curl {auth} {url}/v1/ledger/check"),
        ]
        return [
            f"The ledger is on: node {demo.node!r} (premium, ${PRICE_USD} per vCPU-hour, "
            f"${STAKE_USD} staked) owns the agent's platform {demo.ppid}, {demo.user!r} has "
            "$10. Then:",
            *(line for why, command in steps for line in (f"  # {why}", f"  {command}")),
        ]

    def _slash_steps(self, node: str, slashed: str) -> list[tuple[str, str]]:
        """How to see a slash: the outage under way (``--slash``), or how to cause one."""
        if self.outage_sec is None:
            return [("a slash: stop this demo (Ctrl-C) and run it again with --slash; it cuts "
                     f"the agent's tunnel for {OUTAGE_SEC:.0f} s, over premium's 25.92 s per "
                     "30 days", "eecp demo --ledger --slash")]
        return [
            (f"--slash: the agent's tunnel is cut now for {self.outage_sec:g} s (premium "
             "allows 25.92 s per 30 days); within about three minutes \"slashes\" lists "
             "$1.44 and the stake is $1.44 less", node),
            ("the slashed stake's account", slashed),
        ]


def allowlist_for(measurements: Measurements, provider: DevQuoteProvider) -> dict[str, Any]:
    """The upstream-format allowlist that admits exactly this agent on the dev provider."""
    return {
        "version": "1.0",
        "measurements": measurements.as_dict(),
        "quote_measurements": {"mrtd": provider.mrtd.hex(),
                               **{f"rtmr{i}": r.hex() for i, r in enumerate(provider.rtmrs)}},
    }


def agent_config(directory: Path, control_port: int, backend_port: int,
                 settings: DemoSettings) -> AgentConfig:
    """The demo agent's configuration, as its ``EE_*`` variables would give it."""
    node = {"EE_NODE_ID": NODE} if settings.ledger else {}
    return agent_from_env({
        **node,
        "EE_CONTROL_WS": f"ws://127.0.0.1:{control_port}/v1/tunnel",
        "EE_REPO": REPO, "EE_RELEASE_TAG": TAG, "EE_APP_NAME": APP, "EE_NETWORK": NETWORK,
        "EE_AGENT_ID_FILE": str(directory / "agent-id"),
        "EE_BACKEND_URL": f"http://127.0.0.1:{backend_port}",
        "EE_QUOTE_PROVIDER": "dev", "EE_DEV_PKI_DIR": str(directory / "dev-pki"),
        "EE_HEALTH_INTERVAL_SEC": "10",
        "EE_LOG_FORMAT": settings.log_format, "EE_LOG_LEVEL": settings.log_level,
    })


def eecp_env(directory: Path, pccs_port: int, settings: DemoSettings) -> dict[str, str]:
    """eecp's ``EE_*`` variables for the demo: loopback only, SQLite, the dev root, no GitHub;
    with the ledger, its admin token, a 60-second period (the waits inside one period
    shorter than it), no notice for price increases and the demo's slash interval."""
    ledger = {
        "EE_LEDGER_ENABLED": "true", "EE_ADMIN_TOKEN": admin_token(directory),
        "EE_LEDGER_PERIOD": str(PERIOD_SEC), "EE_SETTLEMENT_DELAY_SEC": "10",
        "EE_OBSERVER_GAP_TOLERANCE_SEC": "30", "EE_SETTLEMENT_RECONNECT_GRACE_SEC": "30",
        "EE_PRICE_INCREASE_NOTICE_SEC": "0", "EE_SLASH_MIN_INTERVAL_SEC": str(SLASH_INTERVAL_SEC),
    } if settings.ledger else {}
    return {
        **ledger,
        "EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": str(settings.control_port),
        "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": str(settings.proxy_port),
        "EE_AUTH_BIND": "127.0.0.1", "EE_AUTH_PORT": str(settings.auth_port),
        "EE_DB_PATH": str(directory / "control-plane.db"),
        "EE_DCAP_ROOT_CA": str(directory / "dev-pki" / "root.pem"),
        "EE_PCCS_URL": f"http://127.0.0.1:{pccs_port}",
        "EE_ALLOWLIST_DIR": str(directory / "allowlists"),
        # every allowlist is local: a GitHub that cannot be reached is never needed
        "EE_GITHUB_API_URL": "http://127.0.0.1:9",
        "EE_LOG_FORMAT": settings.log_format, "EE_LOG_LEVEL": settings.log_level,
    }


def admin_token(directory: Path) -> str:
    """The demo's admin token: made once (``admin-token``, 0600), then reused."""
    path = directory / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


async def serve_hello(request: Request, responder: Responder) -> None:
    """The demo's app: the backend the agent forwards to, inside the "TD"."""
    text = [("content-type", "text/plain; charset=utf-8")]
    if request.path == "/health":
        await responder.respond(200, text, b"ok\n")
    elif request.path == "/echo":
        body = await request.read_body(1024 * 1024)
        await responder.respond(200, [("content-type", "application/octet-stream")], body)
    elif request.path == "/events":
        await responder.send_head(200, [("content-type", "text/event-stream"),
                                        ("cache-control", "no-store")])
        for tick in range(5):
            await responder.send(f"data: tick {tick}\n\n".encode())
            await trio.sleep(1)
        await responder.end()
    elif request.path == "/":
        await responder.respond(200, text, HELLO)
    else:
        await responder.respond(404, text, b"not found\n")


def prepare(directory: Path, config: AgentConfig) -> tuple[DevQuoteProvider, Measurements]:
    """Blocking set-up (a worker thread): the dev quote provider (its PKI is created on the
    first run), the agent's measurements, and the allowlist eecp will read for ``REPO@TAG``."""
    provider = build_provider(config)
    assert isinstance(provider, DevQuoteProvider)  # EE_QUOTE_PROVIDER=dev
    measurements = measure(config)
    owner, name = REPO.split("/")
    target = directory / "allowlists" / owner / name / f"{TAG}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(allowlist_for(measurements, provider), indent=2) + "\n")
    return provider, measurements


async def serve_demo(settings: DemoSettings, *, shutdown: trio.Event | None = None,
                     handle_signals: bool = True,
                     task_status: trio.TaskStatus[DemoUrls] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the demo until SIGINT/SIGTERM (or ``shutdown``); report :class:`DemoUrls` once the
    agent is attested. Raises :class:`DemoError` if it is not within ``ATTEST_WITHIN_SEC``."""
    shutdown = trio.Event() if shutdown is None else shutdown
    directory = settings.directory.resolve()
    with _files_in(directory):
        directory.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as outer:
        if handle_signals:
            outer.start_soon(watch_signals, shutdown, name="signals")
        backend_port: int = await outer.start(serve_http, serve_hello, "127.0.0.1", 0)
        # the agent's config needs eecp's port, and eecp's needs the PCCS, which needs the PKI:
        # build a provisional agent config to create the PKI and take the measurements
        draft = agent_config(directory, settings.control_port, backend_port, settings)
        with _files_in(directory):
            provider, measurements = await trio.to_thread.run_sync(prepare, directory, draft)
        pccs_port: int = await outer.start(serve_http, DevPccs(provider.pki,
                                                               fmspc=provider.fmspc),
                                           "127.0.0.1", 0)
        with _files_in(directory):
            env = await trio.to_thread.run_sync(eecp_env, directory, pccs_port, settings)
        config = from_env(env)
        ready = False
        async with trio.open_nursery() as inner:
            bound: Bound = await inner.start(partial(serve, config, shutdown=shutdown,
                                                     handle_signals=False))
            ledger = None
            if settings.ledger:
                assert config.admin_token is not None
                ledger = DemoLedger(config.admin_token,
                                    devpki.platform_ppid(provider.pck_key).hex())
                await open_accounts(bound.control_url, ledger)
            agent = partial(run_agent, agent_config(directory, bound.control_port,
                                                    backend_port, settings),
                            provider, measurements)
            # the first agent's own stop: --slash sets it to cut the tunnel; so does shutdown
            first_stop, first_ended = trio.Event(), trio.Event()
            inner.start_soon(_set_on, shutdown, first_stop)
            state: AgentState = await inner.start(partial(
                _run_then_set, partial(agent, stop=first_stop), first_ended))
            ready = await _wait_attested(state, shutdown)
            if ready and ledger is not None:
                await confirm_platform(bound.control_url, ledger)
            outage = settings.outage_sec if settings.slash and ledger is not None else None
            if ready:
                task_status.started(DemoUrls(bound, ledger=ledger, outage_sec=outage))
            if ready and outage is not None:
                await _outage(inner, agent, (first_stop, first_ended), shutdown, outage)
        outer.cancel_scope.cancel()
    if not ready:  # after a graceful stop of everything
        raise DemoError("demo_stopped", "stopped before the agent was attested")


@contextmanager
def _files_in(directory: Path) -> Iterator[None]:
    """A directory the demo cannot write in is a :class:`DemoError` naming it and ``--dir``
    (``eecp demo`` prints it as one line)."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or directory
        raise DemoError("demo_dir_unusable", f"cannot write {where} (--dir): "
                        f"{exc.strerror or exc}") from exc


async def _set_on(first: trio.Event, then: trio.Event) -> None:
    await first.wait()
    then.set()


async def _run_then_set(run: Callable[..., Awaitable[None]], ended: trio.Event, *,
                        task_status: trio.TaskStatus[AgentState] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    try:
        await run(task_status=task_status)
    finally:
        ended.set()


async def _outage(nursery: trio.Nursery, agent: Callable[..., Awaitable[None]],
                  first: tuple[trio.Event, trio.Event], shutdown: trio.Event,
                  seconds: float) -> None:
    """``--slash``: stop the first agent (its tunnel closes: counted downtime of the node), and
    start another ``seconds`` after it has returned (eecp has seen the close by then), unless
    the demo is stopping by then."""
    stop, ended = first
    log.warning("eecp demo --slash: cutting the agent's tunnel for %gs", seconds)
    stop.set()
    await ended.wait()
    with trio.move_on_after(seconds):
        await shutdown.wait()
    if shutdown.is_set():
        return
    state: AgentState = await nursery.start(partial(agent, stop=shutdown))
    await _wait_attested(state, shutdown)
    log.warning("eecp demo --slash: the agent is back; the settler slashes the node within "
                "about three minutes")


async def open_accounts(control_url: str, demo: DemoLedger) -> None:
    """The node (priced, funded, staked) and the user's credits, through eecp's own API. A
    second run replays it, except that a stake a slash reduced is topped back up to
    ``STAKE_USD``, as its operator would: the shortfall bought for ``node:demo-node`` (under a
    fresh key: it is bought only when short), then staked."""
    async with httpx.AsyncClient(base_url=control_url, headers={
            "Authorization": f"Bearer {demo.admin_token}"}) as http:
        async def post(path: str, body: dict[str, object], key: str | None = None) -> None:
            answer = await http.post(path, json=body, headers={"Idempotency-Key": key}
                                     if key else {})
            if answer.status_code != 200:
                raise DemoError("demo_ledger_setup", f"{path}: {answer.status_code} "
                                f"{answer.text[:200]}")

        await post("/v1/nodes/register", {
            "node_id": demo.node, "price_usd_per_vcpu_hour": PRICE_USD,
            "capacity_vcpus": CAPACITY_VCPUS, "stake_tier": TIER, "allow_update": True})
        staked = await http.get(f"/v1/balances/stake:{demo.node}")
        if staked.status_code != 200:
            raise DemoError("demo_ledger_setup", f"stake: {staked.status_code}")
        short = int(STAKE_USD) * 1_000_000 - int(staked.json()["posted_micros"])
        if short > 0:
            await post("/v1/credits/purchase", {
                "account_id": f"node:{demo.node}",
                "amount_usd": f"{short // 1_000_000}.{short % 1_000_000:06d}"},
                f"demo-node-stake-{secrets.token_hex(8)}")
            # a target: what the stake lacks of it moves from node:demo-node to stake:demo-node
            await post("/v1/nodes/register", {"node_id": demo.node,
                                              "stake_amount_usd": STAKE_USD,
                                              "allow_update": True})
        await post("/v1/credits/purchase", {"account_id": demo.user, "amount_usd": "10"},
                   "demo-credits")


async def confirm_platform(control_url: str, demo: DemoLedger) -> None:
    """Confirm the agent's platform for the node, once its attestation left the claim
    (the claim is written just after the agent is told it is attested)."""
    async with httpx.AsyncClient(base_url=control_url, headers={
            "Authorization": f"Bearer {demo.admin_token}"}) as http:
        with trio.move_on_after(10):
            while True:
                answer = await http.post(f"/v1/nodes/{demo.node}/platforms",
                                         json={"ppid": demo.ppid})
                if answer.status_code == 200:
                    return
                if answer.json().get("error") != "platform_not_claimed":
                    break
                await trio.sleep(0.1)
        raise DemoError("demo_ledger_setup", f"the platform was not confirmed: "
                        f"{answer.status_code} {answer.text[:200]}")


async def _wait_attested(state: AgentState, shutdown: trio.Event) -> bool:
    """True once the agent is attested; False when the demo is stopped first."""
    with trio.move_on_after(ATTEST_WITHIN_SEC) as scope:
        await state.wait_for(lambda s: shutdown.is_set() or (
            s.last_status is not None and s.last_status.reason == "attested"))
    if not scope.cancelled_caught:
        return not shutdown.is_set()
    last = state.last_status.reason if state.last_status else state.last_error
    shutdown.set()
    raise DemoError("demo_not_attested",
                    f"the agent was not attested within {ATTEST_WITHIN_SEC:.0f}s "
                    f"(last: {last})")

"""Two ``eecp serve`` processes on one PostgreSQL decide app names in the database: agents of two
repos claiming the same new app name at the same moment, one on each process, many times —
exactly one repo ever owns each name, and both processes' resolve name that repo once the loser
is refused.

Real processes (``python -m eecp serve``), a throwaway PostgreSQL (:mod:`tests.pgserver`), the
stand-in PCCS and GitHub of the harness, and real WebSocket agents; real time throughout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from eecp.dev import pki as devpki
from tests import pgserver
from tests.databases import PG_URL_ENV, fresh_schema
from tests.harness import ASSET, FakeAgent, allowlist_doc, open_upstreams

ROOT = Path(__file__).resolve().parents[2]
OTHER_REPO = "bob/shop-fork"
ROUNDS = 8


@pytest.fixture(scope="session")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=71)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def eecp_serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """``python -m eecp serve`` with ``env``; yields its control URL once it answers."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("EE_")}
    full.update(env, EE_CONTROL_BIND="127.0.0.1", EE_CONTROL_PORT=str(port),
                EE_PROXY_BIND="127.0.0.1", EE_PROXY_PORT=str(free_port()),
                EE_AUTH_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "eecp", "serve"], cwd=ROOT,
                                   env=full, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cluster_db(pg_url: str | None) -> Iterator[str]:
    """A fresh schema on the run's PostgreSQL, as an EE_DB_URL."""
    if pg_url is None:
        pytest.skip(f"no PostgreSQL for two processes: {PG_URL_ENV} is not set and no "
                    f"throwaway server can be started ({pgserver.unavailable()})")
    with fresh_schema(pg_url, "eecp_two") as url:
        yield url


async def claim(agent: FakeAgent, done: dict[str, str]) -> None:
    """Run ``agent`` until it is attested (its repo noted as a winner) or refused."""
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.wait_for(lambda a: a.closed is not None
                             or any(r == "attested" for _, r in a.statuses()), 20)
        done[agent.repo] = "attested" if agent.closed is None else str(agent.closed)
        nursery.cancel_scope.cancel()


async def test_two_processes_never_give_one_app_name_to_two_repos(
        tmp_path: Path, pki: devpki.DevPki, cluster_db: str) -> None:
    async with open_upstreams(pki) as (pccs, github):
        github.add_release(OTHER_REPO, "v1.2.0", {ASSET: allowlist_doc()})
        root = tmp_path / "root.pem"
        pki.write_root(root)
        env = {"EE_DB_URL": cluster_db, "EE_DCAP_ROOT_CA": str(root), "EE_PCCS_URL": pccs.url,
               "EE_GITHUB_API_URL": github.url, "EE_ADMIN_TOKEN": "admin-secret",
               "EE_TUNNEL_PING_INTERVAL_SEC": "0", "EE_LOG_LEVEL": "WARNING"}
        with eecp_serve(env, tmp_path / "one.log") as one, \
                eecp_serve(env, tmp_path / "two.log") as two:
            for round_ in range(ROUNDS):
                name = f"race-{round_}"
                done: dict[str, str] = {}
                first = FakeAgent(one.replace("http", "ws") + "/v1/tunnel", pki, app=name)
                second = FakeAgent(two.replace("http", "ws") + "/v1/tunnel", pki, app=name,
                                   repo=OTHER_REPO)
                if round_ % 2:  # each process gets to be the first to dial, half the time
                    first.url, second.url = second.url, first.url
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(claim, first, done)
                    nursery.start_soon(claim, second, done)
                winners = [repo for repo, outcome in done.items() if outcome == "attested"]
                assert len(winners) == 1, done
                loser = next(repo for repo in done if repo not in winners)
                assert done[loser] == "(4004, 'app_name_taken')", done
                async with httpx.AsyncClient() as client:
                    for url in (one, two):
                        body = (await client.get(f"{url}/v1/resolve/{name}")).json()
                        assert body["repo"] == winners[0], (url, body)

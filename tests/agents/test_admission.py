"""eecp.agents.admission over the real store, on SQLite and PostgreSQL: the app name's claim, the
renewal, the agent_id's binding, the epoch and the audit row are decided in one unit of work, and
a refusal keeps nothing but its audit row. Two stores on one database stand for two eecp
processes."""

from __future__ import annotations

from dataclasses import replace

import trio

from eecp.agents import admission
from eecp.agents.admission import Admitted, Refused
from eecp.core.blocking import Workers
from eecp.store.records import AgentRecord, AuditEntry
from eecp.store.store import Store, open_store
from eecp.wire.protocol import Register
from tests.databases import Backend
from tests.store.test_store import T0

TTL = 30 * 86400.0


def register(app: str = "hello", repo: str = "acme/hello", tag: str = "v1",
             network: str = "forge-1",
             agent_id: str = "agent-1") -> Register:
    return Register(repo, tag, app, network, agent_id)


def row_for(reg: Register, now: float = T0) -> AgentRecord:
    return AgentRecord(agent_id=reg.agent_id, app_name=reg.app_name, repo=reg.repo,
                       release_tag=reg.release_tag, network=reg.network, first_seen=now,
                       last_seen=now, last_verdict="accepted", last_reason="attested")


def entry_for(reg: Register, now: float = T0) -> AuditEntry:
    return AuditEntry(at=now, app_name=reg.app_name, agent_id=reg.agent_id, repo=reg.repo,
                      release_tag=reg.release_tag, network=reg.network, trigger="register",
                      verdict="accepted", reason="attested")


async def admit(store: Store, reg: Register, now: float = T0) -> Admitted | Refused:
    return await store.atomic(lambda tx: admission.admit(
        tx, reg, row_for(reg, now), entry_for(reg, now), now, TTL))


async def test_the_first_repo_wins_the_name_and_may_move_its_tag(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        first = await admit(store, register())
        assert isinstance(first, Admitted)
        assert (first.app.repo, first.app.expires_at, first.agent.epoch) == (
            "acme/hello", T0 + TTL, 1)
        # the same repo, another tag, a day later: the registration moves and is renewed
        moved = await admit(store, register(tag="v2"), T0 + 86400)
        assert isinstance(moved, Admitted)
        assert (moved.app.release_tag, moved.app.expires_at) == ("v2", T0 + 86400 + TTL)
        assert moved.agent.epoch == 2 and moved.agent.first_seen == T0
        # another repo is refused, and nothing of its attempt is kept but its audit row
        taken = await admit(store, register(repo="mallory/hello", agent_id="agent-2"))
        assert isinstance(taken, Refused) and taken.error.reason == "app_name_taken"
        assert taken.app == moved.app  # the row as it stands, for the session's memory
        assert await store.get_app("hello") == moved.app
        assert await store.get_agent("agent-2") is None
        # no move to another network while the registration lives
        moving = await admit(store, register(network="sandbox-1"), T0 + 86400 * 2)
        assert isinstance(moving, Refused) and moving.error.reason == "network_mismatch"
        # the acceptances' audit rows committed with them; refusals write nothing (the
        # session audits them within the audit budget)
        audit = [(e.agent_id, e.verdict, e.reason) for e in await store.recent_audit()]
        assert audit == [("agent-1", "accepted", "attested"), ("agent-1", "accepted", "attested")]


async def test_an_agent_id_stays_bound_to_its_first_app_and_repo(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        assert isinstance(await admit(store, register()), Admitted)
        # an attested agent of another app with the same (public) agent_id: refused, and the
        # other app's name is not even claimed by the attempt
        other = await admit(store, register(app="other", repo="mallory/other"))
        assert isinstance(other, Refused) and other.error.reason == "agent_id_in_use"
        assert await store.get_app("other") is None
        assert (await store.get_agent("agent-1")).app_name == "hello"  # type: ignore[union-attr]
    async with open_store(backend.config, Workers()) as store:  # and after a restart
        again = await admit(store, register(app="other", repo="mallory/other"))
        assert isinstance(again, Refused) and again.error.reason == "agent_id_in_use"
        mine = await admit(store, register())
        assert isinstance(mine, Admitted) and mine.agent.epoch == 2
        # an operator releases it: another app may take it, from epoch 1
        assert await store.release_agent("agent-1")
        theirs = await admit(store, register(app="other", repo="mallory/other"))
        assert isinstance(theirs, Admitted) and theirs.agent.epoch == 1


async def test_a_superseded_sessions_verdicts_are_not_written(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store, \
            open_store(backend.config, Workers()) as elsewhere:
        first = await admit(store, register())
        assert isinstance(first, Admitted)
        later = replace(first.agent, last_seen=T0 + 60)
        periodic = replace(entry_for(register(), T0 + 60), trigger="periodic")
        assert await store.atomic(lambda tx: admission.record_verdict(tx, later, periodic))
        # the agent reconnects to another process, which admits it at the next epoch
        second = await admit(elsewhere, register(), T0 + 120)
        assert isinstance(second, Admitted) and second.agent.epoch == 2
        stale = replace(first.agent, last_verdict="refused", last_reason="tcb_status:OutOfDate")
        refused = replace(periodic, at=T0 + 180, verdict="refused", reason="tcb_status:OutOfDate")
        assert not await store.atomic(lambda tx: admission.record_verdict(tx, stale, refused))
        assert await store.get_agent("agent-1") == second.agent
        (newest, *_) = await store.recent_audit()
        assert (newest.verdict, newest.reason) == ("refused", "superseded")


async def test_two_processes_claiming_new_names_at_once_give_each_to_one_repo(
        backend: Backend) -> None:
    # two eecp processes on one database, agents of two repos claiming the same new app names
    # (and the same agent ids) at the same moment, many times: the database decides
    names = [f"app-{n:02d}" for n in range(16)]
    won: dict[str, list[str]] = {name: [] for name in names}
    async with open_store(backend.config, Workers(store=4)) as one, \
            open_store(backend.config, Workers(store=4)) as two:

        async def claim(store: Store, repo: str, name: str, agent_id: str) -> None:
            result = await admit(store, register(app=name, repo=repo, agent_id=agent_id))
            if isinstance(result, Admitted):
                won[name].append(repo)
            else:
                assert result.error.reason in ("app_name_taken", "agent_id_in_use"), result
                assert result.app is None or result.app.repo != repo

        async with trio.open_nursery() as nursery:
            for n, name in enumerate(names):
                nursery.start_soon(claim, one, "acme/one", name, f"agent-{n}")
                nursery.start_soon(claim, two, "acme/two", name, f"agent-{n}")
                nursery.start_soon(claim, two, "acme/two", name, f"agent-b{n}")
        apps = {a.name: a.repo for a in await one.list_apps()}
        agents = {a.agent_id: (a.app_name, a.repo) for a in await two.list_agents()}
    assert sorted(apps) == names
    for name in names:
        assert len(set(won[name])) == 1, won  # exactly one repo ever owns it
        assert apps[name] == won[name][0]
    for agent_id, (name, repo) in agents.items():
        assert apps[name] == repo, (agent_id, name, repo)  # no agent bound to a loser

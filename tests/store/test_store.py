"""eecp.store against SQLite and PostgreSQL.

PostgreSQL is the server EECP_TEST_PG_URL names, else a throwaway one this suite starts
(:mod:`tests.pgserver`, when the postgresql package is installed: ``.ci/run`` installs it);
without either the PostgreSQL runs are skipped, saying so. Each test gets a fresh schema
(``search_path`` set through the URL's ``options``), so the database named by EECP_TEST_PG_URL
only needs to let its user create schemas, e.g.::

    EECP_TEST_PG_URL=postgresql://eecp:secret@127.0.0.1:5432/eecp_test \
        pytest tests/store/test_store.py
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from eecp.core.blocking import Workers
from eecp.core.clock import FixedClock
from eecp.core.config import Config
from eecp.core.errors import ConfigError, StoreError
from eecp.store import migrations as migrations_module
from eecp.store.migrations import LATEST_SCHEMA_VERSION, MIGRATIONS
from eecp.store.records import AgentRecord, AppRecord, AuditEntry
from eecp.store.store import Store, open_store
from tests.databases import Backend

T0 = 1_754_000_000.123456  # fractional on purpose: times must survive as 8-byte floats


def app(name: str = "hello", **changes: Any) -> AppRecord:
    base = AppRecord(
        name=name,
        repo="acme/hello-enclave",
        release_tag="v1.2.3",
        network="forge-1",
        registered_at=T0,
        expires_at=T0 + 30 * 86400,
        last_attested_at=T0 + 61.5,
        last_verdict="accepted",
        last_reason="ok",
    )
    return replace(base, **changes)


def agent(agent_id: str = "agent-1", **changes: Any) -> AgentRecord:
    base = AgentRecord(
        agent_id=agent_id,
        app_name="hello",
        repo="acme/hello-enclave",
        release_tag="v1.2.3",
        network="forge-1",
        first_seen=T0,
        last_seen=T0 + 12.25,
        sealed=True,
        last_attested_at=T0 + 12.0,
        last_verdict="refused",
        last_reason="tcb_status:OutOfDate",
    )
    return replace(base, **changes)


def audit(n: int = 0, **changes: Any) -> AuditEntry:
    base = AuditEntry(
        at=T0 + n,
        app_name="hello",
        agent_id=f"agent-{n}",
        repo="acme/hello-enclave",
        release_tag="v1.2.3",
        network="forge-1",
        trigger="periodic",
        verdict="refused",
        reason="quote_measurement_mismatch:rtmr2",
        tcb_status="SWHardeningNeeded",
        advisory_ids=("INTEL-SA-00828", "INTEL-SA-00837"),
        fmspc="00806f050000",
        mrtd="a1" * 48,
        rtmrs=("b0" * 48, "b1" * 48, "b2" * 48, "b3" * 48),
        sealed=False,
        platform_id="5a6f4221b2493f02cae028ed31628faa",
    )
    return replace(base, **changes)


# --- round trips ------------------------------------------------------------------------------


async def test_open_migrates_and_creates_parent_dir(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        assert await store.schema_version() == LATEST_SCHEMA_VERSION
        assert await store.ping() is True
        assert await store.list_apps() == []
        assert await store.list_agents() == []
        assert await store.recent_audit() == []
    if backend.name == "sqlite":
        assert backend.config.db_path.is_file()
        assert backend.config.db_path.parent.name == "dir"


async def test_app_round_trip_get_list_delete(backend: Backend) -> None:
    full = app("hello")
    bare = app("bare", repo="o/r", last_attested_at=None, last_verdict=None, last_reason=None)
    async with open_store(backend.config, Workers()) as store:
        await store.save_app(full)
        await store.save_app(bare)
        got = await store.get_app("hello")
        assert got == full
        assert got is not None and got.expires_at == T0 + 30 * 86400  # exact float
        assert await store.get_app("bare") == bare
        assert await store.get_app("missing") is None
        assert await store.list_apps() == [bare, full]  # ordered by name

        await store.write_agent(agent(app_name="hello"))
        await store.append_audit(audit(app_name="hello"))
        assert await store.delete_app("hello") is True
        assert await store.delete_app("hello") is False
        assert await store.get_app("hello") is None
        assert await store.list_apps() == [bare]
        # History outlives the registration.
        assert [a.agent_id for a in await store.list_agents("hello")] == ["agent-1"]
        assert len(await store.recent_audit("hello")) == 1


async def test_save_app_is_an_upsert_by_name(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        await store.save_app(app("hello"))
        changed = app(
            "hello",
            release_tag="v2.0.0",
            expires_at=T0 + 60 * 86400,
            last_attested_at=None,
            last_verdict="refused",
            last_reason="measurement_mismatch:agent_py_sha256",
        )
        await store.save_app(changed)
        assert await store.list_apps() == [changed]
    assert backend.raw("SELECT COUNT(*) FROM app") == [(1,)]


async def test_agent_round_trip_upsert_and_filter(backend: Backend) -> None:
    a1 = agent("agent-1", app_name="hello", sealed=True)
    a2 = agent("agent-2", app_name="hello", sealed=False, last_verdict=None, last_reason=None)
    a3 = agent("agent-3", app_name="other", sealed=None, last_attested_at=None)
    async with open_store(backend.config, Workers()) as store:
        for record in (a3, a2, a1):
            await store.write_agent(record)
        assert await store.list_agents() == [a1, a2, a3]
        assert await store.list_agents("hello") == [a1, a2]
        assert await store.list_agents("other") == [a3]
        assert await store.list_agents("nobody") == []
        sealed = [a.sealed for a in await store.list_agents()]
        assert sealed[0] is True and sealed[1] is False and sealed[2] is None

        moved = replace(a1, last_seen=T0 + 999.5, release_tag="v9", sealed=False)
        await store.write_agent(moved)
        assert await store.list_agents("hello") == [moved, a2]
        assert len(await store.list_agents()) == 3


async def test_an_agents_writes_are_fenced_by_its_epoch(backend: Backend) -> None:
    # a superseded session's write, made at its (older) epoch, changes nothing once a newer
    # admission holds the row: however late it lands, and from whichever process
    old = agent("agent-1", release_tag="v1", epoch=1)
    async with open_store(backend.config, Workers(store=4)) as store, \
            open_store(backend.config, Workers(store=4)) as elsewhere:
        assert await store.write_agent(old) is True  # no row yet: inserted
        newer = replace(old, release_tag="v2", epoch=2)
        assert await elsewhere.atomic(lambda tx: tx.write_agent(newer, epoch=1)) is True
        assert await store.write_agent(replace(old, last_seen=T0 + 999)) is False
        assert await store.atomic(lambda tx: tx.write_agent(replace(old, epoch=3))) is False
        assert await store.list_agents() == [newer]
        assert await elsewhere.write_agent(replace(newer, last_seen=T0 + 5)) is True
        # a write for another app or repo never lands on the row, whatever its epoch
        assert await store.write_agent(replace(newer, app_name="other")) is False
        assert await store.write_agent(replace(newer, repo="mallory/other")) is False
        assert await store.list_agents() == [replace(newer, last_seen=T0 + 5)]


async def test_a_unit_of_work_commits_whole_or_not_at_all(backend: Backend) -> None:
    class Boom(Exception):
        pass

    def half(tx: Any) -> None:
        tx.insert_app(app("hello"))
        tx.insert_agent(agent("agent-1"))
        raise Boom

    async with open_store(backend.config, Workers()) as store:
        with pytest.raises(Boom):
            await store.atomic(half)
        assert await store.list_apps() == [] and await store.list_agents() == []

        def savepointed(tx: Any) -> bool:
            tx.insert_app(app("hello"))
            with contextlib.suppress(Boom), tx.savepoint():
                tx.insert_agent(agent("agent-1"))
                raise Boom
            return bool(tx.insert_agent(agent("agent-2")))
        assert await store.atomic(savepointed) is True
        assert [a.name for a in await store.list_apps()] == ["hello"]
        assert [a.agent_id for a in await store.list_agents()] == ["agent-2"]
        # an insert of a row that exists does nothing, and says so
        assert await store.atomic(lambda tx: tx.insert_app(app("hello", repo="x/y"))) is False
        assert (await store.get_app("hello")) == app("hello")


async def test_a_version_1_database_is_migrated_and_its_agent_rows_are_the_bindings(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(migrations_module, "LATEST_SCHEMA_VERSION", 1)
    async with open_store(backend.config, Workers()) as store:
        assert await store.schema_version() == 1
    backend.raw("INSERT INTO agent (agent_id, app_name, repo, release_tag, network, first_seen, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)", "agent-1", "hello",
                "acme/hello-enclave", "v1.2.3", "forge-1", T0, T0)
    backend.raw("INSERT INTO audit_log (at, app_name, agent_id, repo, release_tag, network, "
                "trigger, verdict, reason, advisory_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                T0, "hello", "agent-1", "acme/hello-enclave", "v1.2.3", "forge-1", "register",
                "accepted", "attested", "[]")
    monkeypatch.undo()
    async with open_store(backend.config, Workers()) as store:
        assert await store.schema_version() == LATEST_SCHEMA_VERSION >= 3
        (row,) = await store.list_agents()  # the old row, at epoch 0 (the next admission: 1)
        assert (row.app_name, row.epoch) == ("hello", 0)
        assert await store.write_agent(agent("agent-1", app_name="other")) is False
        (entry,) = await store.recent_audit()
        assert (entry.reason, entry.platform_id) == ("attested", None)
        await store.append_audit(audit(2))
        assert (await store.recent_audit())[0] == audit(2)


async def test_audit_round_trip_every_field(backend: Backend) -> None:
    full = audit(7)
    sparse = audit(
        8,
        trigger="register",
        verdict="accepted",
        reason="ok",
        tcb_status=None,
        advisory_ids=(),
        fmspc=None,
        mrtd=None,
        rtmrs=(),
        sealed=None,
        platform_id=None,
    )
    async with open_store(backend.config, Workers()) as store:
        id_full = await store.append_audit(full)
        id_sparse = await store.append_audit(replace(sparse, id=12345))  # id is ignored
        assert id_sparse > id_full >= 1
        newest, older = await store.recent_audit()
    assert newest == sparse and newest.id == id_sparse
    assert older == full and older.id == id_full
    assert older.advisory_ids == ("INTEL-SA-00828", "INTEL-SA-00837")
    assert older.rtmrs == ("b0" * 48, "b1" * 48, "b2" * 48, "b3" * 48)
    assert older.sealed is False and newest.sealed is None
    assert newest.advisory_ids == () and newest.rtmrs == ()
    stored = backend.raw("SELECT advisory_ids, rtmr3, platform_id FROM audit_log WHERE id = ?",
                         id_full)
    assert stored == [('["INTEL-SA-00828", "INTEL-SA-00837"]', "b3" * 48,
                       "5a6f4221b2493f02cae028ed31628faa")]


async def test_audit_is_newest_first_filtered_and_limited(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        ids = []
        for n in range(10):
            # Same ``at`` for all: order must come from insertion, not the clock.
            entry = audit(n, at=T0, app_name="a" if n % 2 else "b")
            ids.append(await store.append_audit(entry))
        assert ids == sorted(ids) and len(set(ids)) == 10

        newest3 = await store.recent_audit(limit=3)
        assert [e.id for e in newest3] == ids[:-4:-1]
        assert [e.agent_id for e in newest3] == ["agent-9", "agent-8", "agent-7"]

        only_a = await store.recent_audit("a", limit=50)
        assert [e.agent_id for e in only_a] == [
            "agent-9",
            "agent-7",
            "agent-5",
            "agent-3",
            "agent-1",
        ]
        assert [e.agent_id for e in await store.recent_audit("b", limit=2)] == [
            "agent-8",
            "agent-6",
        ]
        assert await store.recent_audit("nobody") == []
        assert await store.recent_audit(limit=0) == []
        assert len(await store.recent_audit()) == 10
        # the last acceptance, however many refusals came after it
        await store.append_audit(audit(10, verdict="accepted", reason="attested", app_name="a"))
        for n in range(11, 16):
            await store.append_audit(audit(n, app_name="a"))
        accepted = await store.recent_audit("a", limit=3, verdict="accepted")
        assert [(e.agent_id, e.verdict) for e in accepted] == [("agent-10", "accepted")]
        refused = await store.recent_audit("a", limit=2, verdict="refused")
        assert [e.agent_id for e in refused] == ["agent-15", "agent-14"]


async def test_audit_rejects_more_than_four_rtmrs(sqlite_backend: Backend) -> None:
    async with open_store(sqlite_backend.config, Workers()) as store:
        with pytest.raises(ValueError):
            await store.append_audit(audit(rtmrs=("00",) * 5))
        assert await store.recent_audit() == []


async def test_collateral_save_load_replace(backend: Backend) -> None:
    clock = FixedClock(T0)
    doc = '{"tcbInfo": {"fmspc": "00806f050000"}, "signature": "' + "ab" * 2000 + '"}'
    async with open_store(backend.config, Workers(), clock=clock) as store:
        assert await store.load_collateral("tcb:00806f050000") is None
        await store.save_collateral("tcb:00806f050000", doc, T0 + 86400.5)
        assert await store.load_collateral("tcb:00806f050000") == doc
        assert await store.load_collateral("tcb:other") is None

        clock.advance(100)
        await store.save_collateral("tcb:00806f050000", "newer", T0 + 2 * 86400)
        assert await store.load_collateral("tcb:00806f050000") == "newer"
    rows = backend.raw("SELECT key, document, next_update, updated_at FROM collateral")
    assert rows == [("tcb:00806f050000", "newer", T0 + 2 * 86400, T0 + 100)]


# --- lifecycle ----------------------------------------------------------------------------------


async def test_data_survives_restart_and_migrations_do_not_rerun(backend: Backend) -> None:
    async with open_store(backend.config, Workers(), clock=FixedClock(T0)) as store:
        await store.save_app(app())
        await store.write_agent(agent())
        audit_id = await store.append_audit(audit(3))
        await store.save_collateral("k", "doc", T0 + 5)

    async with open_store(backend.config, Workers(), clock=FixedClock(T0 + 500)) as store:
        assert await store.schema_version() == LATEST_SCHEMA_VERSION
        assert await store.get_app("hello") == app()
        assert await store.list_agents() == [agent()]
        (entry,) = await store.recent_audit()
        assert entry == audit(3) and entry.id == audit_id
        assert await store.load_collateral("k") == "doc"

    # One row per migration, stamped at the first open: the second open applied nothing.
    versions = backend.raw("SELECT version, applied_at FROM schema_version ORDER BY version")
    assert versions == [(v, T0) for v, _ in MIGRATIONS]


async def test_refuses_a_schema_newer_than_the_code(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        await store.save_app(app())
    backend.raw(
        "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
        LATEST_SCHEMA_VERSION + 1,
        T0,
    )
    with pytest.raises(StoreError) as info:
        async with open_store(backend.config, Workers()):
            pytest.fail("opened a database newer than the code")
    assert info.value.reason == "schema_too_new"
    assert str(LATEST_SCHEMA_VERSION + 1) in info.value.detail
    assert backend.raw("SELECT name FROM app") == [("hello",)]  # untouched


async def test_two_stores_migrating_at_once_apply_each_migration_once(backend: Backend) -> None:
    versions: list[int] = []

    async def open_one() -> None:
        async with open_store(backend.config, Workers()) as store:
            versions.append(await store.schema_version())

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(open_one)
    assert versions == [LATEST_SCHEMA_VERSION] * 4
    assert backend.raw("SELECT COUNT(*) FROM schema_version") == [(len(MIGRATIONS),)]


def test_migrations_are_numbered_in_order() -> None:
    assert [v for v, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1][0] == LATEST_SCHEMA_VERSION


async def test_closing_under_cancellation_still_closes(sqlite_backend: Backend) -> None:
    wal = trio.Path(f"{sqlite_backend.config.db_path}-wal")
    with trio.CancelScope() as scope:
        async with open_store(sqlite_backend.config, Workers()) as store:
            await store.save_app(app())
            assert await wal.exists()
            scope.cancel()
            await trio.sleep(10)
    assert scope.cancelled_caught
    # The last connection closing checkpoints the WAL and removes it: close really ran.
    assert not await wal.exists()
    assert await store.ping() is False
    with pytest.raises(StoreError) as info:
        await store.list_apps()
    assert info.value.reason == "store_unavailable"
    assert sqlite_backend.raw("SELECT name FROM app") == [("hello",)]


# --- SQLite specifics -------------------------------------------------------------------------


async def test_sqlite_is_in_wal_mode_with_the_pragmas(sqlite_backend: Backend) -> None:
    async with open_store(sqlite_backend.config, Workers()) as store:
        assert sqlite_backend.raw("PRAGMA journal_mode") == [("wal",)]

        def pragmas() -> list[object]:
            # Per-connection settings, read on one of the store's own pooled connections.
            db = store._db
            return [
                db.execute_sql(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            ]

        assert await store._run(pragmas) == ["wal", 1, 5000, 1]  # synchronous NORMAL == 1


async def test_concurrent_writes_all_land(backend: Backend) -> None:
    async with open_store(backend.config, Workers(store=4)) as store:
        ids: list[int] = []

        async def one(n: int) -> None:
            ids.append(await store.append_audit(audit(n, agent_id=f"agent-{n:03d}")))
            await store.write_agent(agent(f"agent-{n % 20:03d}", last_seen=T0 + n))

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(one, n)

        assert len(ids) == 200 and len(set(ids)) == 200
        entries = await store.recent_audit(limit=1000)
        assert len(entries) == 200
        assert {e.agent_id for e in entries} == {f"agent-{n:03d}" for n in range(200)}
        assert [e.id for e in entries] == sorted(ids, reverse=True)
        assert len(await store.list_agents()) == 20
        assert await store.ping() is True


# --- failures ---------------------------------------------------------------------------------


async def test_unopenable_sqlite_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    # Root ignores permission bits, so "unwritable" is made of a file standing in the way.
    for path in (blocker / "cp.db", tmp_path):  # parent is a file; the path is a directory
        config = Config(db_path=path)
        with pytest.raises(StoreError) as info:
            async with open_store(config, Workers()):
                pytest.fail("opened an impossible database")
        assert info.value.reason == "store_unavailable"
        assert type(info.value) is StoreError
        assert await Store(config, Workers()).ping() is False


async def test_database_failure_mid_flight_is_a_store_error(backend: Backend) -> None:
    async with open_store(backend.config, Workers()) as store:
        await store.save_app(app())
        backend.raw("DROP TABLE app")
        for call in (store.list_apps(), store.get_app("hello"), store.save_app(app())):
            with pytest.raises(StoreError) as info:
                await call
            assert info.value.reason == "store_unavailable"
            assert "app" in info.value.detail
            assert info.value.__cause__ is not None
        assert await store.ping() is True  # the database itself still answers


async def test_unreachable_postgres_is_a_store_error() -> None:
    pytest.importorskip("psycopg2", reason="psycopg2 missing (pip install .[postgres])")
    # Port 1 on loopback: refused at once, no server needed.
    config = Config(db_url="postgresql://eecp:pw@127.0.0.1:1/eecp?connect_timeout=2")
    assert await Store(config, Workers()).ping() is False
    with pytest.raises(StoreError) as info:
        async with open_store(config, Workers()):
            pytest.fail("opened an unreachable database")
    assert info.value.reason == "store_unavailable"
    assert "pw" not in str(info.value)


# --- describe / selection ---------------------------------------------------------------------


def test_describe_names_the_database_without_secrets(tmp_path: Path) -> None:
    workers = Workers()
    assert Store(Config(), workers).describe() == "sqlite:data/control-plane.db"
    assert Store(Config(db_path=tmp_path / "x.db"), workers).describe() == f"sqlite:{tmp_path}/x.db"
    assert Store(Config(db_url="sqlite:///rel/cp.db"), workers).describe() == "sqlite:rel/cp.db"
    assert Store(Config(db_url="sqlite:////abs/cp.db"), workers).describe() == "sqlite:/abs/cp.db"
    assert Store(Config(db_url="sqlite:///"), workers).describe() == "sqlite:data/control-plane.db"
    pg = Store(
        Config(db_url="postgresql://eecp:s3cr%40t@db.internal:5433/eecp?password=s3cr%40t"),
        workers,
    )
    assert pg.describe() == "postgresql://eecp@db.internal:5433/eecp"
    assert pg.is_postgres
    assert Store(Config(db_url="postgres://db/eecp"), workers).describe() == "postgres://db/eecp"


def test_unusable_db_urls_are_config_errors() -> None:
    for url in ("sqlite:///:memory:", "postgresql://db.internal:5432/"):
        with pytest.raises(ConfigError) as info:
            Store(Config(db_url=url), Workers())
        assert info.value.variable == "EE_DB_URL"

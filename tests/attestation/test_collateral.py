"""eecp.collateral against a stand-in PCCS on a real socket, with Intel's real sample collateral."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import dcap_qvl
import httpx
import pytest
import trio

from eecp.attestation import collateral
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.collateral_doc import CollateralParts, parts_from_dcap_json, raw_json_members
from eecp.core.clock import FixedClock, parse_isoformat
from eecp.core.errors import CollateralError
from tests.fake_pccs import ENDPOINTS, FakePccs, open_fake_pccs
from tests.vectors import vector

#: inside the sample's validity window (tcbInfo issued 2025-06-19, PCK CRL next 2025-07-19)
T_INSIDE = parse_isoformat("2025-06-25T00:00:00Z")
#: the earliest nextUpdate of the sample: the PCK CRL's (tcbInfo 10:16:03, QE identity 10:32:27)
SAMPLE_NEXT_UPDATE = parse_isoformat("2025-07-19T10:00:35Z")
MARGIN = 3600.0
KEY = "tdx:B0C06F000000:platform"


class MemoryPersistence:
    """The persistence protocol in a dict (the store implements it for real)."""

    def __init__(self) -> None:
        self.docs: dict[str, str] = {}
        self.next_updates: dict[str, float] = {}
        self.saves = 0
        self.fail_load = False
        self.fail_save = False
        self.saved = trio.Event()

    async def load_collateral(self, key: str) -> str | None:
        if self.fail_load:
            raise RuntimeError("store down")
        return self.docs.get(key)

    async def save_collateral(self, key: str, document: str, next_update: float) -> None:
        if self.fail_save:
            raise RuntimeError("store down")
        self.saves += 1
        self.docs[key] = document
        self.next_updates[key] = next_update
        self.saved.set()


@pytest.fixture
def collateral_text() -> str:
    return vector("dcap/tdx_quote_collateral.json").read_text()


@pytest.fixture
def sample() -> dict[str, str]:
    doc: dict[str, str] = json.loads(vector("dcap/tdx_quote_collateral.json").read_text())
    return doc


@pytest.fixture
def quote() -> bytes:
    return vector("dcap/tdx_quote").read_bytes()


@pytest.fixture
def platform(quote: bytes) -> tuple[str, str]:
    parsed = dcap_qvl.parse_quote(quote)
    fmspc, ca = parsed.fmspc(), parsed.ca()
    assert (fmspc, ca) == ("B0C06F000000", "platform")
    return fmspc, ca


@pytest.fixture
async def pccs(collateral_text: str) -> AsyncIterator[FakePccs]:
    async with open_fake_pccs(collateral_text) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T_INSIDE)


def make_cache(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    persistence: MemoryPersistence | None = None,
    **kwargs: Any,
) -> CollateralCache:
    return CollateralCache(client, pccs.url, clock, persistence, MARGIN, **kwargs)


def hits(pccs: FakePccs) -> dict[str, int]:
    return {name: pccs.hits[name] for name in ENDPOINTS}


ONE_EACH = dict.fromkeys(ENDPOINTS, 1)


# ------------------------------------------------------------------------------------------------
# Fetching


@pytest.mark.parametrize("root_crl_encoding", ["der", "hex"])
async def test_fetched_parts_verify_up_to_date(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    quote: bytes,
    platform: tuple[str, str],
    sample: dict[str, str],
    root_crl_encoding: str,
) -> None:
    pccs.root_crl_encoding = root_crl_encoding  # type: ignore[assignment]
    cache = make_cache(client, pccs, clock)
    parts = await cache.get(*platform, "tdx")

    report = dcap_qvl.verify(quote, parts.to_dcap(), int(T_INSIDE))
    assert report.status == "UpToDate"
    # byte for byte as signed, and everything else exactly the sample's
    assert parts.tcb_info == sample["tcb_info"]
    assert parts.qe_identity == sample["qe_identity"]
    assert parts.tcb_info_signature.hex() == sample["tcb_info_signature"]
    assert parts.qe_identity_signature.hex() == sample["qe_identity_signature"]
    assert parts.root_ca_crl.hex() == sample["root_ca_crl"]
    assert parts.pck_crl.hex() == sample["pck_crl"]
    assert parts.pck_crl_issuer_chain == sample["pck_crl_issuer_chain"]
    assert parts.tcb_info_issuer_chain == sample["tcb_info_issuer_chain"]
    assert parts.qe_identity_issuer_chain == sample["qe_identity_issuer_chain"]
    assert parts.next_update == SAMPLE_NEXT_UPDATE
    assert parts.fetched_at == T_INSIDE
    assert hits(pccs) == ONE_EACH

    by_path = {r.path: r.query for r in pccs.server.requests}
    assert by_path["/sgx/certification/v4/pckcrl"] == {"ca": "platform", "encoding": "der"}
    assert by_path["/tdx/certification/v4/tcb"] == {"fmspc": "B0C06F000000"}
    assert "/tdx/certification/v4/qe/identity" in by_path
    assert "/sgx/certification/v4/rootcacrl" in by_path


async def test_fresh_dcap_object_per_call_carries_no_pck_chain(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    parts = await make_cache(client, pccs, clock).get(*platform, "tdx")
    first, second = parts.to_dcap(), parts.to_dcap()
    assert first is not second
    # exactly the nine cached fields: nothing quote-specific rides along to the next quote
    assert json.loads(first.to_json()) == json.loads(second.to_json())
    assert set(json.loads(first.to_json())) == {
        "pck_crl_issuer_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info_issuer_chain",
        "tcb_info",
        "tcb_info_signature",
        "qe_identity_issuer_chain",
        "qe_identity",
        "qe_identity_signature",
    }


async def test_envelope_whitespace_and_v3_header_keep_signed_bytes(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    quote: bytes,
    platform: tuple[str, str],
    sample: dict[str, str],
) -> None:
    pccs.envelope_spacing = " \n\t "
    pccs.tcb_chain_header = "SGX-TCB-Info-Issuer-Chain"
    parts = await make_cache(client, pccs, clock).get(*platform, "tdx")
    assert parts.tcb_info == sample["tcb_info"]
    assert parts.qe_identity == sample["qe_identity"]
    assert dcap_qvl.verify(quote, parts.to_dcap(), int(T_INSIDE)).status == "UpToDate"


async def test_base_url_with_certification_suffix(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = CollateralCache(client, pccs.url + "/sgx/certification/v4/", clock, None, MARGIN)
    parts = await cache.get(*platform, "tdx")
    assert parts.next_update == SAMPLE_NEXT_UPDATE
    assert hits(pccs) == ONE_EACH


# ------------------------------------------------------------------------------------------------
# Caching


async def test_cache_hit_does_not_touch_pccs(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = make_cache(client, pccs, clock)
    assert not cache.holds(*platform, "tdx")
    first = await cache.get(*platform, "tdx")
    assert cache.holds("b0c06f000000", "platform", "tdx")
    assert not cache.holds(platform[0], "processor", "tdx")
    clock.advance(86400)  # a day later, still far from the margin
    second = await cache.get("b0c06f000000", "platform", "tdx")  # key is case-insensitive
    assert second is first
    assert hits(pccs) == ONE_EACH


async def test_pccs_down_with_valid_cache_serves_cache(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    platform: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    sample: dict[str, str],
) -> None:
    cache = make_cache(client, pccs, clock)
    first = await cache.get(*platform, "tdx")
    pccs.up = False
    clock.advance(SAMPLE_NEXT_UPDATE - MARGIN / 2 - clock.now())  # inside margin: must try
    requests_before = len(pccs.server.requests)
    with caplog.at_level(logging.WARNING, logger="eecp.collateral"):
        again = await cache.get(*platform, "tdx")
    assert again is first
    assert len(pccs.server.requests) > requests_before  # it did try the PCCS
    assert "serving cached copy" in caplog.text
    assert sample["tcb_info"][:200] not in caplog.text  # documents are never logged


async def test_pccs_down_nothing_cached_is_unavailable(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    pccs.up = False
    cache = make_cache(client, pccs, clock)
    with pytest.raises(CollateralError) as err:
        await cache.get(*platform, "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert not cache.holds(*platform, "tdx")  # a failure is no collateral
    assert err.value.http_status == 503


async def test_expired_cache_and_pccs_down_is_expired(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = make_cache(client, pccs, clock)
    await cache.get(*platform, "tdx")
    pccs.up = False
    clock.advance(SAMPLE_NEXT_UPDATE - clock.now())  # exactly nextUpdate: a CRL is expired then
    with pytest.raises(CollateralError) as err:
        await cache.get(*platform, "tdx")
    assert err.value.reason == "collateral_expired"
    # and again (no back-off path may hand out the expired copy either)
    with pytest.raises(CollateralError) as err:
        await cache.get(*platform, "tdx")
    assert err.value.reason == "collateral_expired"


async def test_freshly_fetched_but_expired_is_expired(
    client: httpx.AsyncClient, pccs: FakePccs, platform: tuple[str, str]
) -> None:
    late = FixedClock(parse_isoformat("2025-08-01T00:00:00Z"))
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, late).get(*platform, "tdx")
    assert err.value.reason == "collateral_expired"
    assert hits(pccs) == ONE_EACH


async def test_get_inside_margin_refetches(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = make_cache(client, pccs, clock)
    await cache.get(*platform, "tdx")
    clock.advance(SAMPLE_NEXT_UPDATE - MARGIN + 1 - clock.now())
    parts = await cache.get(*platform, "tdx")
    assert hits(pccs) == dict.fromkeys(ENDPOINTS, 2)
    assert parts.fetched_at == SAMPLE_NEXT_UPDATE - MARGIN + 1


async def test_failed_refetch_backs_off_while_cache_valid(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = make_cache(client, pccs, clock, retry_interval_sec=60)
    first = await cache.get(*platform, "tdx")
    clock.advance(SAMPLE_NEXT_UPDATE - MARGIN / 2 - clock.now())
    pccs.fail("tcb", 500)
    assert await cache.get(*platform, "tdx") is first
    assert pccs.hits["tcb"] == 2
    clock.advance(30)
    assert await cache.get(*platform, "tdx") is first
    assert pccs.hits["tcb"] == 2  # within the retry interval: no new attempt
    clock.advance(31)
    pccs.heal()
    fresh = await cache.get(*platform, "tdx")
    assert fresh is not first
    assert pccs.hits["tcb"] == 3


async def test_refresh_ahead_refetches_only_inside_margin(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    cache = make_cache(client, pccs, clock)
    await cache.get(*platform, "tdx")
    await cache.refresh_ahead()
    assert hits(pccs) == ONE_EACH  # far from next_update: nothing to do
    clock.advance(SAMPLE_NEXT_UPDATE - MARGIN + 10 - clock.now())
    await cache.refresh_ahead()
    assert hits(pccs) == dict.fromkeys(ENDPOINTS, 2)
    # the refreshed copy is now what get() serves, without another fetch
    parts = await cache.get(*platform, "tdx")
    assert parts.fetched_at == SAMPLE_NEXT_UPDATE - MARGIN + 10
    assert hits(pccs) == dict.fromkeys(ENDPOINTS, 2)


async def test_refresh_ahead_logs_instead_of_raising(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    platform: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(client, pccs, clock)
    await cache.get(*platform, "tdx")
    pccs.up = False
    clock.advance(SAMPLE_NEXT_UPDATE + 1 - clock.now())  # expired and the PCCS is down
    with caplog.at_level(logging.WARNING, logger="eecp.collateral"):
        await cache.refresh_ahead()
    assert "collateral_expired" in caplog.text


async def test_serve_refresher_runs_refresh_ahead(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    store = MemoryPersistence()
    cache = make_cache(client, pccs, clock, store)
    await cache.get(*platform, "tdx")
    clock.advance(SAMPLE_NEXT_UPDATE - MARGIN + 10 - clock.now())
    store.saved = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(cache.serve_refresher, interval_sec=0.01))
        with trio.fail_after(5):
            await store.saved.wait()  # the refresher fetched and saved a new copy
        nursery.cancel_scope.cancel()
    assert hits(pccs) == dict.fromkeys(ENDPOINTS, 2)
    assert store.saves == 2


async def test_concurrent_gets_share_one_fetch(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    pccs.delay_sec = 0.2  # long enough for every caller to be queued behind the first fetch
    cache = make_cache(client, pccs, clock)
    results: list[CollateralParts] = []

    async def one() -> None:
        results.append(await cache.get(*platform, "tdx"))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert len(results) == 8
    assert all(r is results[0] for r in results)
    assert hits(pccs) == ONE_EACH


async def test_concurrent_gets_share_one_failure(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    pccs.delay_sec = 0.2
    pccs.fail("*", 503)
    cache = make_cache(client, pccs, clock)
    reasons: list[str] = []

    async def one() -> None:
        try:
            await cache.get(*platform, "tdx")
        except CollateralError as exc:
            reasons.append(exc.reason)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert reasons == ["collateral_unavailable"] * 5
    assert hits(pccs) == ONE_EACH  # one attempt, not five in a row


async def test_fetch_timeout_is_unavailable(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    pccs.delay_sec = 30
    cache = make_cache(client, pccs, clock, fetch_timeout_sec=0.2)
    started = trio.current_time()
    with pytest.raises(CollateralError) as err:
        await cache.get(*platform, "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert "0.2s" in err.value.detail
    assert trio.current_time() - started < 5


# ------------------------------------------------------------------------------------------------
# Persistence


async def test_restart_without_pccs_serves_persisted_copy(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    quote: bytes,
    platform: tuple[str, str],
) -> None:
    store = MemoryPersistence()
    original = await make_cache(client, pccs, clock, store).get(*platform, "tdx")
    assert set(store.docs) == {KEY}
    assert store.next_updates[KEY] == SAMPLE_NEXT_UPDATE

    pccs.up = False
    restarted = make_cache(client, pccs, clock, store)
    parts = await restarted.get(*platform, "tdx")
    assert parts == original
    assert dcap_qvl.verify(quote, parts.to_dcap(), int(T_INSIDE)).status == "UpToDate"
    assert hits(pccs) == ONE_EACH
    assert len(pccs.server.requests) == 4  # valid and outside the margin: PCCS not even tried


async def test_restart_with_expired_persisted_copy_and_pccs_down(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    store = MemoryPersistence()
    await make_cache(client, pccs, clock, store).get(*platform, "tdx")
    pccs.up = False
    late = FixedClock(SAMPLE_NEXT_UPDATE + 1)
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, late, store).get(*platform, "tdx")
    assert err.value.reason == "collateral_expired"


async def test_persistence_failures_do_not_break_get(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    store = MemoryPersistence()
    store.fail_load = store.fail_save = True
    parts = await make_cache(client, pccs, clock, store).get(*platform, "tdx")
    assert parts.next_update == SAMPLE_NEXT_UPDATE
    assert store.docs == {}


async def test_corrupt_persisted_document_is_refetched(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    store = MemoryPersistence()
    store.docs[KEY] = '{"tcb_info": "truncated'
    parts = await make_cache(client, pccs, clock, store).get(*platform, "tdx")
    assert parts.next_update == SAMPLE_NEXT_UPDATE
    assert hits(pccs) == ONE_EACH
    assert CollateralParts.from_json(store.docs[KEY]) == parts


# ------------------------------------------------------------------------------------------------
# Malformed answers


def _with_signature(raw: str, sig: str) -> bytes:
    return f'{{"tcbInfo":{raw},"signature":"{sig}"}}'.encode()


@pytest.mark.parametrize(
    "case",
    [
        "not_json",
        "no_signature",
        "trailing_garbage",
        "duplicate_member",
        "short_signature",
        "non_hex_signature",
        "inner_not_object",
        "wrong_fmspc",
        "not_utf8",
    ],
)
async def test_malformed_tcb_envelope_is_unavailable(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    platform: tuple[str, str],
    sample: dict[str, str],
    case: str,
) -> None:
    raw, sig = sample["tcb_info"], sample["tcb_info_signature"]
    bodies = {
        "not_json": b"<html>maintenance</html>",
        "no_signature": f'{{"tcbInfo":{raw}}}'.encode(),
        "trailing_garbage": _with_signature(raw, sig) + b"}",
        "duplicate_member": f'{{"tcbInfo":{raw},"tcbInfo":{raw},"signature":"{sig}"}}'.encode(),
        "short_signature": _with_signature(raw, sig[:-2]),
        "non_hex_signature": _with_signature(raw, "zz" * 64),
        "inner_not_object": _with_signature(json.dumps(raw), sig),
        "wrong_fmspc": _with_signature(raw.replace("B0C06F000000", "00906ED50000"), sig),
        "not_utf8": _with_signature(raw, sig).replace(b'"TDX"', b'"TD\xff"'),
    }
    pccs.bodies["tcb"] = bodies[case]
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, clock).get(*platform, "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert "TCB info" in err.value.detail


@pytest.mark.parametrize(
    ("endpoint", "status"), [("pckcrl", 500), ("rootcacrl", 404), ("qe_identity", 503)]
)
async def test_error_status_is_unavailable(
    client: httpx.AsyncClient,
    pccs: FakePccs,
    clock: FixedClock,
    platform: tuple[str, str],
    endpoint: str,
    status: int,
) -> None:
    pccs.fail(endpoint, status)
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, clock).get(*platform, "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert f"HTTP {status}" in err.value.detail


async def test_garbage_crl_is_unavailable(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock, platform: tuple[str, str]
) -> None:
    pccs.bodies["rootcacrl"] = b"\x30\x82garbage"
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, clock).get(*platform, "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert "root CA CRL" in err.value.detail


async def test_unknown_fmspc_is_unavailable(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock
) -> None:
    with pytest.raises(CollateralError) as err:
        await make_cache(client, pccs, clock).get("00906ED50000", "platform", "tdx")
    assert err.value.reason == "collateral_unavailable"
    assert "HTTP 404" in err.value.detail


async def test_entries_without_collateral_are_bounded(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock,
    platform: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the FMSPC comes from a quote not verified yet: new names must not grow memory for ever
    monkeypatch.setattr(collateral, "MAX_EMPTY_ENTRIES", 4)
    cache = make_cache(client, pccs, clock)
    good = await cache.get(*platform, "tdx")
    for n in range(10):
        with pytest.raises(CollateralError):
            await cache.get(f"{0xA0000000 + n:012X}", "platform", "tdx")
    keys = list(cache._entries)
    assert len(keys) == 5 and keys[0] == cache.key(*platform, "tdx")
    assert keys[1:] == [cache.key(f"{0xA0000000 + n:012X}", "platform", "tdx")
                        for n in range(6, 10)]  # the newest failures, and the platform kept
    before = hits(pccs)
    assert await cache.get(*platform, "tdx") is good  # still cached: no fetch
    assert hits(pccs) == before


async def test_bad_key_is_a_value_error(
    client: httpx.AsyncClient, pccs: FakePccs, clock: FixedClock
) -> None:
    cache = make_cache(client, pccs, clock)
    with pytest.raises(ValueError):
        await cache.get("B0C06F", "platform", "tdx")
    with pytest.raises(ValueError):
        await cache.get("B0C06F000000", "other", "tdx")
    assert pccs.total_hits == 0


# ------------------------------------------------------------------------------------------------
# Documents (sync)


def test_parts_from_dcap_json_and_round_trip(
    collateral_text: str, quote: bytes, sample: dict[str, str]
) -> None:
    parts = parts_from_dcap_json(collateral_text, fetched_at=123.0)
    assert parts.next_update == SAMPLE_NEXT_UPDATE
    assert parts.fetched_at == 123.0
    assert parts.tcb_info == sample["tcb_info"]
    assert dcap_qvl.verify(quote, parts.to_dcap(), int(T_INSIDE)).status == "UpToDate"

    doc = json.loads(parts.to_json())
    assert list(doc)[:9] == list(sample)  # dcap-qvl's names, in its order
    assert {k: doc[k] for k in sample} == sample  # same hex encoding, same text
    assert doc["next_update"] == SAMPLE_NEXT_UPDATE
    assert doc["fetched_at"] == 123.0
    assert CollateralParts.from_json(parts.to_json()) == parts
    # dcap-qvl itself reads our document (it ignores the two extra fields)
    theirs = dcap_qvl.QuoteCollateralV3.from_json(parts.to_json())
    assert dcap_qvl.verify(quote, theirs, int(T_INSIDE)).status == "UpToDate"


def test_from_json_recomputes_next_update(collateral_text: str) -> None:
    doc = json.loads(parts_from_dcap_json(collateral_text).to_json())
    doc["next_update"] = 4102444800.0  # a stored lie must not extend validity
    assert CollateralParts.from_json(json.dumps(doc)).next_update == SAMPLE_NEXT_UPDATE


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("pck_crl"),
        lambda d: d.update(root_ca_crl="nothex"),
        lambda d: d.update(pck_crl="3000"),
        lambda d: d.update(tcb_info='{"id":"TDX"}'),
        lambda d: d.update(qe_identity=5),
        lambda d: d.update(fetched_at="yesterday"),
    ],
)
def test_from_json_rejects_broken_documents(collateral_text: str, mutate: Any) -> None:
    doc = json.loads(collateral_text)
    mutate(doc)
    with pytest.raises(ValueError):
        CollateralParts.from_json(json.dumps(doc))


def test_is_valid_at_is_strict() -> None:
    parts = parts_from_dcap_json(vector("dcap/tdx_quote_collateral.json").read_text())
    assert parts.is_valid_at(SAMPLE_NEXT_UPDATE - 1)
    assert not parts.is_valid_at(SAMPLE_NEXT_UPDATE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"a":{"b":"}{\\"","c":[1,{"d":2}]},"s":"x"}',
            {"a": '{"b":"}{\\"","c":[1,{"d":2}]}', "s": '"x"'},
        ),
        (' {\n "a" :\t[ 1 , 2 ] ,"b":null }\n', {"a": "[ 1 , 2 ]", "b": "null"}),
        ("{}", {}),
        ('{"\\u0061":"\\u00e9"}', {"a": '"\\u00e9"'}),
    ],
)
def test_raw_json_members(text: str, expected: dict[str, str]) -> None:
    assert raw_json_members(text) == expected


@pytest.mark.parametrize(
    "text", ["[1]", '{"a":1', '{"a":1,}', '{"a" 1}', '{"a":1}x', '{"a":1,"a":2}', "", "{a:1}"]
)
def test_raw_json_members_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        raw_json_members(text)

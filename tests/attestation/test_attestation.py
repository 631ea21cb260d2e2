"""The attestation engine end to end: minted quotes through real dcap-qvl, collateral from a
stand-in PCCS and allowlists from a stand-in GitHub, both on real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from eecp.attestation.allowlist import AllowlistSource
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.engine import AttestationEngine, Challenge
from eecp.core.blocking import Workers
from eecp.core.clock import FixedClock
from eecp.core.config import Config
from eecp.core.ratelimit import SharedLimit
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.wire.measurements import Measurements, report_data_for
from tests.fake_github import FakeGitHub, open_fake_github
from tests.fake_pccs import FakePccs, open_fake_pccs

NOW = 1_790_000_000.0
REPO, TAG = "acme/shop", "v1.2.0"
MEAS = Measurements("a" * 64, "b" * 64, "tag=v1.2.0\nsha256=" + "c" * 64, True)
UNSEALED = replace(MEAS, sealed=False)


def allowlist_doc(**overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "version": "1.0", "release_tag": TAG,
        "measurements": MEAS.as_dict(),
        "report_data": (MEAS.digest() + bytes(32)).hex(),
        "quote_measurements": {
            "mrtd": devmint.DEFAULT_MRTD.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(devmint.DEFAULT_RTMRS)}},
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


@dataclass
class Rig:
    pki: devpki.DevPki
    pccs: FakePccs
    github: FakeGitHub
    clock: FixedClock
    engine: AttestationEngine
    nonce_counter: int = 0

    def nonce(self) -> bytes:
        self.nonce_counter += 1
        return self.nonce_counter.to_bytes(32, "big")

    def challenge(self, minted: devmint.MintedQuote, nonce: bytes, *, network: str = "forge-1",
                  measurements: Measurements = MEAS, repo: str = REPO, tag: str = TAG,
                  claimed: bytes | None = None) -> Challenge:
        return Challenge(repo=repo, release_tag=tag, network=network, nonce=nonce,
                         quote=minted.quote,
                         claimed_report_data=minted.report_data if claimed is None else claimed,
                         measurements=measurements.as_dict())

    def mint(self, nonce: bytes, measurements: Measurements = MEAS, **kwargs: Any
             ) -> devmint.MintedQuote:
        return devmint.mint_tdx_quote(self.pki, now=NOW,
                                 report_data=report_data_for(measurements, nonce), **kwargs)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    pki = devpki.make_pki(seed=3)
    baseline = devmint.mint_tdx_quote(pki, now=NOW)
    clock = FixedClock(NOW + 3600)
    async with open_fake_pccs(baseline.collateral_json) as pccs, open_fake_github() as github, \
            httpx.AsyncClient() as client:
        github.add_release(REPO, TAG, {"agent-attestation-allowlist.json": allowlist_doc()})
        config = Config()
        engine = AttestationEngine(
            collateral=CollateralCache(client, pccs.url, clock, None, 3600.0),
            allowlists=AllowlistSource(client=client, clock=clock, github_api_url=github.url,
                                       asset_name=config.allowlist_asset, token=None,
                                       local_dir=None, cache_ttl_sec=300,
                                       fetch_limit=SharedLimit(per_minute=0, per_key=2)),
            workers=Workers(), clock=clock, networks=config.networks,
            allowed_statuses=config.allowed_tcb_statuses, root_ca_der=pki.root_der)
        yield Rig(pki, pccs, github, clock, engine)


async def test_good_quote_is_accepted_with_facts_for_the_audit(rig: Rig) -> None:
    nonce = rig.nonce()
    minted = rig.mint(nonce)
    outcome = await rig.engine.attest(rig.challenge(minted, nonce))
    assert outcome.accepted and outcome.reason == "attested"
    assert outcome.tcb_status == "UpToDate"
    entry = outcome.audit_entry(challenge=rig.challenge(minted, nonce), app_name="shop",
                                agent_id="agent-1", trigger="register")
    assert entry.verdict == "accepted" and entry.reason == "attested"
    assert entry.mrtd == devmint.DEFAULT_MRTD.hex()
    assert entry.rtmrs == tuple(r.hex() for r in devmint.DEFAULT_RTMRS)
    assert entry.fmspc == devmint.DEFAULT_FMSPC.upper() and entry.sealed is True
    assert entry.at == rig.clock.now()


async def test_replayed_quote_is_refused(rig: Rig) -> None:
    old = rig.nonce()
    minted = rig.mint(old)
    assert (await rig.engine.attest(rig.challenge(minted, old))).accepted
    fresh = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(minted, fresh))
    assert (outcome.accepted, outcome.reason) == (False, "nonce_mismatch")


@pytest.mark.parametrize(("mint_kwargs", "challenge_kwargs", "reason"), [
    ({"rtmrs": (*devmint.DEFAULT_RTMRS[:1], bytes(48), *devmint.DEFAULT_RTMRS[2:])}, {},
     "quote_measurement_mismatch:rtmr1"),
    ({"mrtd": b"\x01" * 48}, {}, "quote_measurement_mismatch:mrtd"),
    ({"pcesvn": devmint.OUTDATED_PCESVN}, {}, "tcb_status:OutOfDate"),
    ({"td_attributes": devmint.SEPT_VE_DISABLE_BIT | devmint.DEBUG_BIT}, {}, "debug_td"),
    ({"corrupt_signature": True}, {}, "quote_invalid"),
    ({}, {"claimed": bytes(64)}, "report_data_mismatch"),
    ({}, {"network": "moon-1"}, "network_unknown"),
    ({}, {"tag": "v9.9.9"}, "allowlist_not_found"),
    ({}, {"repo": "../etc"}, "allowlist_invalid_ref"),
])
async def test_refusals_have_their_reason(rig: Rig, mint_kwargs: dict[str, Any],
                                          challenge_kwargs: dict[str, Any], reason: str) -> None:
    nonce = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce, **mint_kwargs), nonce,
                                                    **challenge_kwargs))
    assert (outcome.accepted, outcome.reason) == (False, reason)


async def test_wrong_measurement_is_refused(rig: Rig) -> None:
    other = replace(MEAS, agent_py_sha256="d" * 64)
    nonce = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce, other), nonce,
                                                    measurements=other))
    assert outcome.reason == "measurement_mismatch:agent_py_sha256"
    # measurements that were not the ones quoted are caught by the binding
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce, measurements=other))
    assert outcome.reason == "measurements_binding_mismatch"


async def test_unsealed_refused_on_forge_accepted_on_sandbox(rig: Rig) -> None:
    nonce = rig.nonce()
    minted = rig.mint(nonce, UNSEALED)
    forge = await rig.engine.attest(rig.challenge(minted, nonce, measurements=UNSEALED))
    assert forge.reason == "sealed_required"
    sandbox = await rig.engine.attest(rig.challenge(minted, nonce, network="sandbox-1",
                                                    measurements=UNSEALED))
    assert sandbox.accepted and sandbox.measurements == UNSEALED


async def test_only_a_verified_quote_makes_eecp_ask_github(rig: Rig) -> None:
    # repo and tag are the agent's word: a quote that does not verify must cost no API call
    nonce = rig.nonce()
    before = len(rig.github.requests)
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce, corrupt_signature=True),
                                                    nonce, repo="mallory/any", tag="v0"))
    assert outcome.reason == "quote_invalid" and len(rig.github.requests) == before
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce,
                                                    repo="mallory/any", tag="v0"))
    assert outcome.reason == "allowlist_not_found" and len(rig.github.requests) > before


async def test_github_fetches_count_against_the_verified_quotes_platform(rig: Rig) -> None:
    # (the rig allows 2 fetches a minute per platform) one TD naming release after release
    # runs out of fetches; the platform is the PPID of its verified PCK leaf, for the audit
    platform = ec.generate_private_key(ec.SECP256R1())  # one machine: one PCK key, one PPID
    outcomes = []
    for tag in ("r1", "r2", "r3"):
        nonce = rig.nonce()
        minted = rig.mint(nonce, pck_key=platform)
        outcomes.append(await rig.engine.attest(rig.challenge(minted, nonce, tag=tag)))
    assert [o.reason for o in outcomes] == ["allowlist_not_found"] * 2 + [
        "allowlist_rate_limited"]
    ppid = outcomes[0].platform_id
    assert ppid is not None and len(ppid) == 32
    assert {o.platform_id for o in outcomes} == {ppid}
    entry = outcomes[2].audit_entry(challenge=rig.challenge(minted, nonce, tag="r3"),
                                    app_name="shop", agent_id="agent-1", trigger="register")
    assert (entry.verdict, entry.reason, entry.platform_id) == (
        "refused", "allowlist_rate_limited", ppid)
    nonce = rig.nonce()  # another machine still gets its fetch
    other = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce, tag="r3"))
    assert other.reason == "allowlist_not_found" and other.platform_id not in (None, ppid)
    nonce = rig.nonce()  # a quote that did not verify names no platform
    forged = await rig.engine.attest(rig.challenge(rig.mint(nonce, pck_key=platform,
                                                            corrupt_signature=True), nonce))
    assert (forged.reason, forged.platform_id) == ("quote_invalid", None)


async def test_only_a_pck_chain_under_the_root_makes_eecp_ask_the_pccs(rig: Rig) -> None:
    # the FMSPC is read from the PCK leaf: quotes under another PKI, each naming a new FMSPC,
    # must cost no PCCS request (nor keep a cache entry)
    foreign = devpki.make_pki(seed=4)
    before = sum(rig.pccs.hits.values())
    for fmspc in ("00A1B2C3D4E5", "00A1B2C3D4E6"):
        nonce = rig.nonce()
        minted = devmint.mint_tdx_quote(foreign, now=NOW, report_data=report_data_for(MEAS, nonce),
                                   fmspc=fmspc)
        outcome = await rig.engine.attest(rig.challenge(minted, nonce))
        assert (outcome.accepted, outcome.reason) == (False, "pck_chain_untrusted")
        assert outcome.facts is not None and outcome.facts.fmspc == fmspc  # for the audit
    assert sum(rig.pccs.hits.values()) == before
    nonce = rig.nonce()  # our own PKI's quotes still go through, fetching as before
    assert (await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce))).accepted
    fetched = sum(rig.pccs.hits.values())
    assert fetched > before
    # a platform whose collateral is held: dcap-qvl's verification refuses the foreign chain
    nonce = rig.nonce()
    minted = devmint.mint_tdx_quote(foreign, now=NOW, report_data=report_data_for(MEAS, nonce))
    outcome = await rig.engine.attest(rig.challenge(minted, nonce))
    assert outcome.reason == "quote_invalid" and sum(rig.pccs.hits.values()) == fetched


async def test_revoked_pck_is_refused(rig: Rig) -> None:
    nonce = rig.nonce()
    minted = rig.mint(nonce, revoke_pck=True)
    rig.pccs.set_collateral(minted.collateral_json)  # the PCK CRL now lists this leaf
    outcome = await rig.engine.attest(rig.challenge(minted, nonce))
    assert outcome.reason == "pck_revoked"


@pytest.mark.parametrize(("mint_kwargs", "reason"), [
    ({"revoke_pck": True}, "pck_revoked"),
    ({"td_attributes": devmint.SEPT_VE_DISABLE_BIT | devmint.DEBUG_BIT}, "debug_td"),
    ({"corrupt_signature": True}, None),  # not a genuine platform's: named by nobody
])
async def test_dcap_refusals_of_a_genuine_platform_name_it(
        rig: Rig, mint_kwargs: dict[str, Any], reason: str | None) -> None:
    # what the ledger's fraud signals are attributed by (spec §10.4)
    nonce = rig.nonce()
    ppid = bytes(range(16))
    minted = rig.mint(nonce, ppid=ppid, **mint_kwargs)
    rig.pccs.set_collateral(minted.collateral_json)
    outcome = await rig.engine.attest(rig.challenge(minted, nonce))
    assert not outcome.accepted and outcome.verified is None
    if reason is None:
        assert outcome.reason == "quote_invalid" and outcome.platform_id is None
    else:
        assert (outcome.reason, outcome.platform_id) == (reason, ppid.hex())
        entry = outcome.audit_entry(challenge=rig.challenge(minted, nonce), app_name="shop",
                                    agent_id="a", trigger="register")
        assert entry.platform_id == ppid.hex()


async def test_expired_collateral_is_never_used(rig: Rig) -> None:
    nonce = rig.nonce()
    minted = rig.mint(nonce)
    assert (await rig.engine.attest(rig.challenge(minted, nonce))).accepted
    rig.clock.advance(31 * 86400)  # past every nextUpdate; the PCCS still serves the old one
    outcome = await rig.engine.attest(rig.challenge(minted, nonce))
    assert (outcome.accepted, outcome.reason) == (False, "collateral_expired")


async def test_pccs_down_with_nothing_cached(rig: Rig) -> None:
    rig.pccs.up = False
    nonce = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce))
    assert outcome.reason == "collateral_unavailable"


async def test_malformed_quote_and_measurements(rig: Rig) -> None:
    nonce = rig.nonce()
    minted = rig.mint(nonce)
    bad_quote = Challenge(REPO, TAG, "forge-1", nonce, b"\x04\x00garbage", minted.report_data,
                          MEAS.as_dict())
    assert (await rig.engine.attest(bad_quote)).reason == "quote_malformed"
    bad_meas = replace(rig.challenge(minted, nonce), measurements={"sealed": "yes"})
    assert (await rig.engine.attest(bad_meas)).reason == \
        "measurements_invalid:agent_dir_sha256"


async def test_allowlist_pinning_other_report_data(rig: Rig) -> None:
    rig.github.add_release(REPO, "v2", {"agent-attestation-allowlist.json": allowlist_doc(
        report_data="ff" * 64)})
    nonce = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce, tag="v2"))
    assert outcome.reason == "allowlist_report_data_mismatch"


async def test_malformed_allowlist(rig: Rig) -> None:
    rig.github.add_release(REPO, "v3", {"agent-attestation-allowlist.json": b'{"measurements"'})
    nonce = rig.nonce()
    outcome = await rig.engine.attest(rig.challenge(rig.mint(nonce), nonce, tag="v3"))
    assert outcome.reason.startswith("allowlist_malformed")

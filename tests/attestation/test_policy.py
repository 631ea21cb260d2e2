"""The pure policy, one refusal at a time, in its fixed order (no I/O, no dcap-qvl)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from eecp.attestation import policy
from eecp.attestation.allowlist_doc import Allowlist, parse_allowlist
from eecp.attestation.quotes import QuoteFacts, VerifiedQuote
from eecp.core.errors import AttestationError
from eecp.wire.measurements import Measurements, report_data_for

NONCE = bytes(range(32))
RTMRS = tuple(bytes([i + 1]) * 48 for i in range(4))
MRTD = b"\x07" * 48
GOOD = Measurements("a" * 64, "b" * 64, "tag=v1\nsha256=" + "c" * 64, True)
ALLOWED = frozenset({"UpToDate", "SWHardeningNeeded"})


def make_allowlist(**overrides: Any) -> Allowlist:
    doc: dict[str, Any] = {
        "measurements": GOOD.as_dict(),
        "report_data": (GOOD.digest() + bytes(32)).hex(),
        "quote_measurements": {"mrtd": MRTD.hex(), **{f"rtmr{i}": r.hex()
                                                       for i, r in enumerate(RTMRS)}},
    }
    doc.update(overrides)
    return parse_allowlist(json.dumps(doc).encode())


def make_quote(measurements: Measurements = GOOD, nonce: bytes = NONCE, **facts: Any
               ) -> VerifiedQuote:
    base = QuoteFacts(tee_type="TDX", version=4, fmspc="00906ED50000", ca="platform",
                      report_data=report_data_for(measurements, nonce), mrtd=MRTD, rtmrs=RTMRS,
                      td_attributes=1 << 28)
    return VerifiedQuote(replace(base, **facts), "UpToDate", (), 0.0)


def judge(quote: VerifiedQuote | None = None, *, claimed: bytes | None = None,
          measurements: Measurements = GOOD, allowlist: Allowlist | None = None,
          sealed_network: bool = True, nonce: bytes = NONCE) -> policy.Verdict:
    quote = quote or make_quote(measurements)
    evidence = policy.Evidence(quote, claimed if claimed is not None else
                               quote.facts.report_data, measurements)
    return policy.decide(evidence, nonce=nonce, allowlist=allowlist or make_allowlist(),
                         sealed_network=sealed_network, allowed_statuses=ALLOWED)


def test_good_quote_is_accepted() -> None:
    assert judge() == policy.Verdict(True, "attested")


def test_accepted_statuses_include_sw_hardening() -> None:
    quote = replace(make_quote(), tcb_status="SWHardeningNeeded")
    assert judge(quote).accepted


Case = Callable[[], policy.Verdict]
CASES: list[tuple[str, Case, str]] = [
    ("tcb out of date", lambda: judge(replace(make_quote(), tcb_status="OutOfDate",
                                              advisory_ids=("INTEL-SA-1",))),
     "tcb_status:OutOfDate"),
    ("debug td", lambda: judge(make_quote(td_attributes=(1 << 28) | 1)), "debug_td"),
    ("claimed report_data differs", lambda: judge(claimed=bytes(64)), "report_data_mismatch"),
    ("claimed report_data short", lambda: judge(claimed=b"\x00"), "report_data_mismatch"),
    ("old nonce (replay)", lambda: judge(make_quote(nonce=bytes(32))), "nonce_mismatch"),
    ("nonce of wrong length", lambda: judge(nonce=NONCE[:16]), "nonce_mismatch"),
    ("measurements not bound", lambda: judge(
        make_quote(), measurements=replace(GOOD, agent_py_sha256="d" * 64)),
     "measurements_binding_mismatch"),
    ("agent_py differs", lambda: judge(measurements=replace(GOOD, agent_py_sha256="d" * 64)),
     "measurement_mismatch:agent_py_sha256"),
    ("agent_dir differs", lambda: judge(measurements=replace(GOOD, agent_dir_sha256="d" * 64)),
     "measurement_mismatch:agent_dir_sha256"),
    ("image differs", lambda: judge(measurements=replace(GOOD, vm_image_id="tag=v2")),
     "measurement_mismatch:vm_image_id"),
    ("mrtd differs", lambda: judge(make_quote(mrtd=b"\x08" * 48)),
     "quote_measurement_mismatch:mrtd"),
    ("rtmr0 differs", lambda: judge(make_quote(rtmrs=(bytes(48), *RTMRS[1:]))),
     "quote_measurement_mismatch:rtmr0"),
    ("rtmr2 differs", lambda: judge(make_quote(rtmrs=(*RTMRS[:2], bytes(48), RTMRS[3]))),
     "quote_measurement_mismatch:rtmr2"),
    ("rtmr3 differs", lambda: judge(make_quote(rtmrs=(*RTMRS[:3], bytes(48)))),
     "quote_measurement_mismatch:rtmr3"),
    ("unsealed on sealed network", lambda: judge(measurements=replace(GOOD, sealed=False)),
     "sealed_required"),
    ("allowlist pins other report_data", lambda: judge(
        allowlist=make_allowlist(report_data=("ab" * 32) + "00" * 32)),
     "allowlist_report_data_mismatch"),
    ("sgx quote cannot run agents", lambda: judge(make_quote(tee_type="SGX", mrtd=None,
                                                             rtmrs=())),
     "tee_type_unsupported"),
]


@pytest.mark.parametrize(("name", "case", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_failure_has_its_reason(name: str, case: Case, reason: str) -> None:
    verdict = case()
    assert not verdict.accepted
    assert verdict.reason == reason


def test_unsealed_accepted_on_open_network_with_sealed_allowlist() -> None:
    unsealed = replace(GOOD, sealed=False)
    assert judge(measurements=unsealed, sealed_network=False).accepted


def test_mrtd_is_optional_in_the_allowlist() -> None:
    allowlist = make_allowlist(quote_measurements={f"rtmr{i}": r.hex()
                                                   for i, r in enumerate(RTMRS)})
    assert allowlist.mrtd is None
    assert judge(make_quote(mrtd=b"\x09" * 48), allowlist=allowlist).accepted


def test_order_is_fixed_when_several_things_are_wrong() -> None:
    quote = replace(make_quote(nonce=bytes(32), rtmrs=(bytes(48),) * 4), tcb_status="OutOfDate")
    assert judge(quote).reason == "tcb_status:OutOfDate"
    assert judge(replace(quote, tcb_status="UpToDate")).reason == "nonce_mismatch"


def test_check_raises_typed_errors() -> None:
    quote = make_quote(nonce=bytes(32))
    with pytest.raises(AttestationError) as info:
        policy.check(policy.Evidence(quote, quote.facts.report_data, GOOD), nonce=NONCE,
                     allowlist=make_allowlist(), sealed_network=True, allowed_statuses=ALLOWED)
    assert info.value.reason == "nonce_mismatch" and info.value.http_status == 403

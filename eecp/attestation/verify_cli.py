"""``eecp verify-quote``: the attestation engine as an operator tool.

Exit status: 0 accepted, 1 refused (including a quote that parses but does not verify, e.g. no
matching TCB level or expired collateral), 2 unusable input (unreadable or unparseable files,
collateral that cannot be obtained, bad options) with one clear line on stderr, never a
traceback. With ``--json`` everything is one JSON object on stdout: the report (``"ok": true``,
whatever the verdict) or the error (``{"ok": false, "error": reason, "detail": ...}``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import dcap_qvl
import httpx
import trio

from eecp.attestation import policy
from eecp.attestation.allowlist_doc import Allowlist, parse_allowlist
from eecp.attestation.collateral import CollateralCache
from eecp.attestation.quotes import (
    QuoteFacts,
    VerifiedQuote,
    load_root_ca,
    parse_quote,
    platform_id,
    verify_quote,
)
from eecp.core.clock import SystemClock, isoformat, parse_isoformat
from eecp.core.config import DEFAULT_NETWORKS, from_env, tcb_statuses
from eecp.core.errors import (
    AllowlistError,
    AttestationError,
    CollateralError,
    ConfigError,
    InputError,
    PolicyError,
    QuoteError,
)
from eecp.wire.measurements import Measurements, measurements_from_json

_HEX = re.compile(rb"^(?:0x)?[0-9a-fA-F\s]+$")
_B64 = re.compile(rb"^[A-Za-z0-9+/=\s_-]+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``verify-quote`` options."""
    parser.add_argument("quote_file", metavar="QUOTE_FILE", help="binary, hex or base64 quote")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--collateral", metavar="FILE", type=Path,
                        help="collateral JSON in dcap-qvl's form")
    source.add_argument("--pccs", metavar="URL", help="fetch collateral from this PCCS/PCS "
                        "(default: EE_PCCS_URL, else Intel's PCS)")
    parser.add_argument("--at", metavar="ISO8601", help="verify at this time (default: now)")
    parser.add_argument("--allowlist", metavar="FILE", type=Path,
                        help="upstream allowlist JSON to match measurements against")
    parser.add_argument("--measurements", metavar="FILE", type=Path,
                        help="the agent's claimed measurements (default: the allowlist's)")
    parser.add_argument("--nonce", metavar="HEX", help="32-byte challenge nonce (freshness)")
    parser.add_argument("--network", metavar="NAME",
                        help="judge as on this network (sealed networks need sealed=true)")
    parser.add_argument("--root-ca", metavar="FILE", type=Path,
                        help="replace Intel's root CA (PEM/DER; development only)")
    parser.add_argument("--allow-status", metavar="LIST",
                        help="accepted TCB statuses (default: EE_ALLOWED_TCB_STATUSES)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass(frozen=True)
class Inputs:
    """The tool's inputs, read and validated before anything is verified."""

    quote: bytes
    facts: QuoteFacts
    at: float
    allowed: frozenset[str]
    root: bytes | None
    allowlist: Allowlist | None
    measurements: Measurements | None
    nonce: bytes | None
    sealed_network: bool


def run(args: argparse.Namespace, env: dict[str, str], out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """Run the tool; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        inputs = read_inputs(args, env)
        collateral = obtain_collateral(args, env, inputs)
    except (InputError, ConfigError, QuoteError, AllowlistError, PolicyError,
            CollateralError) as exc:
        # Nothing could be judged: unusable files or options, or no collateral to be had.
        return report_error(exc.reason, exc.detail, as_json=args.json, out=out, err=err)
    verified: VerifiedQuote | None = None
    try:
        verified = verify_quote(inputs.quote, collateral, inputs.at, inputs.root)
        verdict = judge(verified, inputs)
    except AttestationError as exc:
        verdict = policy.Verdict.refuse(exc)
    report = build_report(inputs, verified, verdict)
    if args.json:
        print(json.dumps({"ok": True, **report}, indent=2), file=out)
    else:
        print_text(report, out)
    return 0 if verdict.accepted else 1


def report_error(reason: str, detail: str, *, as_json: bool, out: TextIO | None = None,
                 err: TextIO | None = None) -> int:
    """Say why nothing could be judged: with ``--json`` as one JSON object on stdout (a script
    reads one stream, in one format, whatever happened), else as one line on stderr. Returns
    the exit status, 2."""
    if as_json:
        print(json.dumps({"ok": False, "error": reason, "detail": detail}),
              file=out or sys.stdout)
    else:
        print(f"eecp verify-quote: {reason}: {detail}" if detail else
              f"eecp verify-quote: {reason}", file=err or sys.stderr)
    return 2


def read_inputs(args: argparse.Namespace, env: dict[str, str]) -> Inputs:
    """Read every file and option; ``InputError``/``ConfigError`` for anything unusable."""
    quote = decode_quote(_read(Path(args.quote_file), "quote"))
    facts = parse_quote(quote)
    at = SystemClock().now()
    if args.at:
        try:
            at = parse_isoformat(args.at)
        except ValueError:
            raise InputError("at_invalid", f"--at {args.at!r} is not an ISO 8601 time") from None
    allowed = _allowed_statuses(args, env)
    root = load_root_ca(args.root_ca) if args.root_ca else None
    allowlist = parse_allowlist(_read(args.allowlist, "allowlist")) if args.allowlist else None
    measurements = None
    if args.measurements:
        try:
            obj = json.loads(_read(args.measurements, "measurements"))
        except ValueError:
            raise InputError("measurements_unreadable", "measurements file is not JSON") from None
        measurements = measurements_from_json(obj)
    return Inputs(quote, facts, at, allowed, root, allowlist, measurements,
                  _nonce(args.nonce), _sealed_network(args.network, env))


def judge(verified: VerifiedQuote, inputs: Inputs) -> policy.Verdict:
    """The verdict: TCB status always; freshness with ``--nonce``; the full policy with
    ``--allowlist`` (offline, without ``--nonce``, freshness cannot be judged and is skipped)."""
    policy.check_tcb(verified, inputs.allowed)
    if verified.facts.debug:
        raise QuoteError("debug_td", "TD attributes have the DEBUG bit set")
    report_data = verified.facts.report_data
    if inputs.nonce is not None:
        policy.check_nonce(report_data, inputs.nonce)
    if inputs.allowlist is not None:
        measurements = inputs.measurements or measurements_from_json(
            dict(inputs.allowlist.measurements)
        )
        policy.check(
            policy.Evidence(verified, report_data, measurements),
            nonce=inputs.nonce if inputs.nonce is not None else report_data[32:64],
            allowlist=inputs.allowlist,
            sealed_network=inputs.sealed_network,
            allowed_statuses=inputs.allowed,
        )
    elif inputs.sealed_network and inputs.measurements and not inputs.measurements.sealed:
        raise PolicyError("sealed_required", "this network admits sealed nodes only")
    return policy.Verdict.accept()


def obtain_collateral(args: argparse.Namespace, env: dict[str, str], inputs: Inputs) -> Any:
    """Collateral from ``--collateral`` or fetched from the PCCS (``--pccs`` / EE_PCCS_URL)."""
    if args.collateral:
        try:
            return dcap_qvl.QuoteCollateralV3.from_json(_read(args.collateral, "collateral")
                                                        .decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError("collateral_unreadable",
                             f"{args.collateral}: not dcap-qvl collateral JSON ({exc})") from None
    url = args.pccs or from_env(env).pccs_url
    tee: Literal["tdx", "sgx"] = "tdx" if inputs.facts.tee_type == "TDX" else "sgx"

    async def fetch() -> Any:
        async with httpx.AsyncClient(follow_redirects=True) as client:
            cache = CollateralCache(client=client, base_url=url.rstrip("/"),
                                    clock=_AtClock(inputs.at), persistence=None,
                                    refresh_margin_sec=0)
            parts = await cache.get(inputs.facts.fmspc, inputs.facts.ca, tee)
            return parts.to_dcap()

    try:
        return trio.run(fetch)
    except CollateralError as exc:  # which PCCS, since it may come from EE_PCCS_URL unseen
        raise CollateralError(exc.reason, f"{exc.detail} (PCCS {url})") from None


class _AtClock:
    def __init__(self, at: float) -> None:
        self._at = at

    def now(self) -> float:
        return self._at


def decode_quote(data: bytes) -> bytes:
    """A quote file's bytes: raw binary, or hex, or base64 text (auto-detected)."""
    stripped = data.strip()
    if stripped and _HEX.match(stripped):
        text = re.sub(rb"\s", b"", stripped).removeprefix(b"0x")
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    if stripped and _B64.match(stripped):
        text = re.sub(rb"\s", b"", stripped)
        try:
            if b"-" in text or b"_" in text:
                return base64.urlsafe_b64decode(text)
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            pass
    return data


def build_report(inputs: Inputs, verified: VerifiedQuote | None, verdict: policy.Verdict
                 ) -> dict[str, Any]:
    """The facts and the verdict as one JSON-ready object."""
    facts = verified.facts if verified else inputs.facts
    # the platform an operator confirms for a ledger node (POST /v1/nodes/{id}/platforms)
    platform = verified.platform_id if verified else platform_id(facts.pck_chain, facts.fmspc)
    return {
        "tee_type": facts.tee_type,
        "quote_version": facts.version,
        "fmspc": facts.fmspc,
        "ca": facts.ca,
        "ppid": platform if platform and not platform.startswith("pck-") else None,
        "tcb_status": verified.tcb_status if verified else None,
        "advisory_ids": list(verified.advisory_ids) if verified else [],
        "mrtd": facts.mrtd.hex() if facts.mrtd else None,
        "rtmr0": facts.rtmrs[0].hex() if facts.rtmrs else None,
        "rtmr1": facts.rtmrs[1].hex() if facts.rtmrs else None,
        "rtmr2": facts.rtmrs[2].hex() if facts.rtmrs else None,
        "rtmr3": facts.rtmrs[3].hex() if facts.rtmrs else None,
        "mr_enclave": facts.mr_enclave.hex() if facts.mr_enclave else None,
        "mr_signer": facts.mr_signer.hex() if facts.mr_signer else None,
        "report_data": facts.report_data.hex(),
        "debug": facts.debug,
        "verified_at": isoformat(inputs.at),
        "root_ca": "custom" if inputs.root else "intel",
        "verdict": "accepted" if verdict.accepted else "refused",
        "reason": verdict.reason,
        "detail": verdict.detail,
    }


def print_text(report: dict[str, Any], out: TextIO) -> None:
    """The report as aligned ``key: value`` lines (absent values left out)."""
    for key, value in report.items():
        if value is None or value == "" or (key == "debug" and not value):
            continue
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key + ':':<15} {shown if shown != '' else '-'}", file=out)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what}_unreadable", f"{path}: {exc.strerror}") from None


def _nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        nonce = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise InputError("nonce_invalid", "--nonce must be hex") from None
    if len(nonce) != 32:
        raise InputError("nonce_invalid", f"--nonce must be 32 bytes, got {len(nonce)}")
    return nonce


def _allowed_statuses(args: argparse.Namespace, env: dict[str, str]) -> frozenset[str]:
    if args.allow_status is None:
        return from_env(env).allowed_tcb_statuses
    try:
        return tcb_statuses(args.allow_status)
    except ValueError as exc:
        raise ConfigError("--allow-status", str(exc)) from None


def _sealed_network(name: str | None, env: dict[str, str]) -> bool:
    if name is None:
        return False
    env = {**env}
    env.setdefault("EE_NETWORKS", DEFAULT_NETWORKS)
    network = from_env(env).network(name)
    if network is None:
        raise ConfigError("--network", f"{name!r} is not in EE_NETWORKS")
    return network.sealed


"""``eecp verify-quote`` on the Intel vector and on minted quotes, in text and --json."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from eecp.cli import main
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki
from eecp.wire.measurements import Measurements, report_data_for
from tests import quotefactory as qf
from tests.vectors import vector

AT = "2025-06-25T00:00:00Z"
NOW = 1_790_000_000.0  # 2026-09-21, the minted quotes' "now"
NONCE = bytes(range(32))
MEAS = Measurements("a" * 64, "b" * 64, "tag=v1\nsha256=" + "c" * 64, True)


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["verify-quote", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=7)


def write_minted(tmp_path: Path, minted: devmint.MintedQuote,
                 pki: devpki.DevPki) -> tuple[Path, ...]:
    quote = tmp_path / "quote.bin"
    quote.write_bytes(minted.quote)
    collateral = tmp_path / "collateral.json"
    collateral.write_text(minted.collateral_json)
    root = pki.write_root(tmp_path / "root.pem")
    return quote, collateral, root


def write_allowlist(tmp_path: Path, rtmrs: tuple[bytes, ...] = devmint.DEFAULT_RTMRS) -> Path:
    path = tmp_path / "allowlist.json"
    path.write_text(json.dumps({
        "measurements": MEAS.as_dict(),
        "quote_measurements": {"mrtd": devmint.DEFAULT_MRTD.hex(),
                               **{f"rtmr{i}": r.hex() for i, r in enumerate(rtmrs)}},
    }))
    return path


def test_intel_vector_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, vector("dcap/tdx_quote"), "--collateral",
                       vector("dcap/tdx_quote_collateral.json"), "--at", AT)
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["tee_type"].strip() == "TDX"
    assert lines["fmspc"].strip() == "B0C06F000000"
    assert lines["tcb_status"].strip() == "UpToDate"
    assert lines["mrtd"].strip().startswith("91eb2b44")
    assert lines["rtmr3"].strip() == "00" * 48
    assert lines["verdict"].strip() == "accepted" and lines["reason"].strip() == "attested"


def test_intel_vector_json_and_nonce(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, vector("dcap/tdx_quote"), "--collateral",
                       vector("dcap/tdx_quote_collateral.json"), "--at", AT, "--json",
                       "--nonce", "11" * 32)
    doc = json.loads(out)
    assert code == 1
    assert doc["verdict"] == "refused" and doc["reason"] == "nonce_mismatch"
    assert doc["tcb_status"] == "UpToDate"
    assert doc["report_data"].startswith("9a9d48e7")


def test_intel_vector_expired_collateral_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, vector("dcap/tdx_quote"), "--collateral",
                       vector("dcap/tdx_quote_collateral.json"), "--at", "2026-01-01T00:00:00Z",
                       "--json")
    assert code == 1 and json.loads(out)["reason"] == "collateral_expired"


def test_status_policy_option(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                              pki: devpki.DevPki) -> None:
    minted = qf.mint_outofdate(pki, now=NOW)
    quote, collateral, root = write_minted(tmp_path, minted, pki)
    at = "2026-09-22T00:00:00Z"
    code, out, _ = run(capsys, quote, "--collateral", collateral, "--root-ca", root, "--at", at,
                       "--json")
    doc = json.loads(out)
    assert code == 1 and doc["reason"] == "tcb_status:OutOfDate"
    assert doc["advisory_ids"] == [devmint.OUTDATED_ADVISORY]
    code, out, _ = run(capsys, quote, "--collateral", collateral, "--root-ca", root, "--at", at,
                       "--allow-status", "UpToDate,OutOfDate")
    assert code == 0 and "accepted" in out


def test_minted_quote_with_allowlist_nonce_and_network(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: devpki.DevPki) -> None:
    minted = qf.mint_uptodate(pki, now=NOW, report_data=report_data_for(MEAS, NONCE))
    quote, collateral, root = write_minted(tmp_path, minted, pki)
    base64_quote = tmp_path / "quote.b64"
    base64_quote.write_bytes(base64.b64encode(minted.quote) + b"\n")
    allowlist = write_allowlist(tmp_path)
    common = ["--collateral", collateral, "--root-ca", root, "--at", "2026-09-22T00:00:00Z",
              "--allowlist", allowlist, "--json"]
    code, out, _ = run(capsys, base64_quote, *common, "--nonce", NONCE.hex(), "--network",
                       "forge-1")
    assert code == 0, out
    assert json.loads(out)["mrtd"] == devmint.DEFAULT_MRTD.hex()
    code, out, _ = run(capsys, quote, *common, "--nonce", "00" * 32)
    assert (code, json.loads(out)["reason"]) == (1, "nonce_mismatch")
    rtmrs = devmint.DEFAULT_RTMRS
    bad = write_allowlist(tmp_path, (rtmrs[0], bytes(48), *rtmrs[2:]))
    code, out, _ = run(capsys, quote, *common[:-3], "--allowlist", bad, "--json")
    assert (code, json.loads(out)["reason"]) == (1, "quote_measurement_mismatch:rtmr1")


def test_the_ppid_to_confirm_for_a_node_is_printed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: devpki.DevPki) -> None:
    ppid = bytes(range(16, 32))
    minted = devmint.mint_tdx_quote(pki, now=NOW, ppid=ppid)
    quote, collateral, root = write_minted(tmp_path, minted, pki)
    common = [quote, "--collateral", collateral, "--root-ca", root, "--at",
              "2026-09-22T00:00:00Z"]
    code, out, _ = run(capsys, *common, "--json")
    assert (code, json.loads(out)["ppid"]) == (0, ppid.hex())
    code, out, _ = run(capsys, *common)
    assert f"ppid:           {ppid.hex()}\n" in out


def test_unsealed_measurements_on_sealed_network(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: devpki.DevPki) -> None:
    unsealed = Measurements(MEAS.agent_dir_sha256, MEAS.agent_py_sha256, MEAS.vm_image_id, False)
    minted = qf.mint_uptodate(pki, now=NOW, report_data=report_data_for(unsealed, NONCE))
    quote, collateral, root = write_minted(tmp_path, minted, pki)
    meas = tmp_path / "m.json"
    meas.write_text(json.dumps(unsealed.as_dict()))
    common = [quote, "--collateral", collateral, "--root-ca", root, "--at",
              "2026-09-22T00:00:00Z", "--allowlist", write_allowlist(tmp_path),
              "--measurements", meas, "--json"]
    code, out, _ = run(capsys, *common, "--network", "forge-1")
    assert (code, json.loads(out)["reason"]) == (1, "sealed_required")
    code, out, _ = run(capsys, *common, "--network", "sandbox-1")
    assert code == 0


@pytest.mark.parametrize("scenario, reason", [
    (qf.mint_revoked_pck, "pck_revoked"),
    (qf.mint_bad_signature, "quote_invalid"),
    (qf.mint_debug_td, "debug_td"),
])
def test_minted_failures(capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: devpki.DevPki,
                         scenario: object, reason: str) -> None:
    minted = scenario(pki, now=NOW)  # type: ignore[operator]
    quote, collateral, root = write_minted(tmp_path, minted, pki)
    code, out, _ = run(capsys, quote, "--collateral", collateral, "--root-ca", root, "--at",
                       "2026-09-22T00:00:00Z", "--json")
    assert (code, json.loads(out)["reason"]) == (1, reason)


def test_foreign_root_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 pki: devpki.DevPki) -> None:
    minted = qf.mint_uptodate(pki, now=NOW)
    quote, collateral, _ = write_minted(tmp_path, minted, pki)
    other = devpki.make_pki(seed=99).write_root(tmp_path / "other.pem")
    code, out, _ = run(capsys, quote, "--collateral", collateral, "--root-ca", other, "--at",
                       "2026-09-22T00:00:00Z", "--json")
    assert code == 1 and json.loads(out)["verdict"] == "refused"
    # and without --root-ca, Intel's root refuses it too
    code, out, _ = run(capsys, quote, "--collateral", collateral, "--at",
                       "2026-09-22T00:00:00Z", "--json")
    assert code == 1


UNUSABLE = [
    (lambda t: [t / "missing.bin"], "quote_unreadable"),
    (lambda t: [t / "garbage.bin"], "quote_malformed"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral", t / "garbage.bin"],
     "collateral_unreadable"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral",
                vector("dcap/tdx_quote_collateral.json"), "--nonce", "abc"], "nonce_invalid"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral",
                vector("dcap/tdx_quote_collateral.json"), "--allowlist", t / "garbage.bin"],
     "allowlist_malformed"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral",
                vector("dcap/tdx_quote_collateral.json"), "--root-ca", t / "garbage.bin"],
     "root_ca_unreadable"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral",
                vector("dcap/tdx_quote_collateral.json"), "--network", "nowhere"],
     "--network"),
    (lambda t: [vector("dcap/tdx_quote"), "--collateral",
                vector("dcap/tdx_quote_collateral.json"), "--at", "yesterday"], "at_invalid"),
]


@pytest.mark.parametrize("make_args, needle", UNUSABLE)
def test_unusable_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, make_args: object,
                                              needle: str) -> None:
    (tmp_path / "garbage.bin").write_bytes(b"\x01\x02 not a quote")
    code, out, err = run(capsys, *make_args(tmp_path))  # type: ignore[operator]
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_console_script_never_prints_a_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "g"
    garbage.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "eecp", "verify-quote", str(garbage),
                           "--collateral", str(garbage)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("eecp verify-quote: quote_malformed")
    assert "Traceback" not in proc.stderr


async def test_collateral_fetched_from_a_pccs(tmp_path: Path, pki: devpki.DevPki) -> None:
    from tests.fake_pccs import open_fake_pccs

    minted = qf.mint_uptodate(pki, now=NOW)
    quote, _, root = write_minted(tmp_path, minted, pki)
    async with open_fake_pccs(minted.collateral_json) as pccs:
        command = [sys.executable, "-m", "eecp", "verify-quote", str(quote), "--pccs", pccs.url,
                   "--root-ca", str(root), "--at", "2026-09-22T00:00:00Z", "--json"]
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tcb_status"] == "UpToDate"
        assert pccs.total_hits == 4
        pccs.up = False
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False)
        assert done.returncode == 2
        assert json.loads(done.stdout)["error"] == "collateral_unavailable"


@pytest.mark.parametrize("make_args, needle", UNUSABLE)
def test_with_json_unusable_input_is_one_json_object_on_stdout(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, make_args: object,
        needle: str) -> None:
    (tmp_path / "garbage.bin").write_bytes(b"\x01\x02 not a quote")
    code, out, err = run(capsys, *make_args(tmp_path), "--json")  # type: ignore[operator]
    assert code == 2 and err == ""
    doc = json.loads(out)
    assert doc["ok"] is False and isinstance(doc["detail"], str)
    assert needle in f"{doc['error']}: {doc['detail']}"
    assert set(doc) == {"ok", "error", "detail"}


def test_with_json_a_report_says_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, vector("dcap/tdx_quote"), "--collateral",
                       vector("dcap/tdx_quote_collateral.json"), "--at", AT, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("extra", [[], ["--bogus"]])
def test_with_json_a_usage_error_is_json_too(extra: list[str]) -> None:
    args = ["verify-quote", "--json", *extra] + (["quote.bin"] if extra else [])
    done = subprocess.run([sys.executable, "-m", "eecp", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == ""
    doc = json.loads(done.stdout)
    assert doc["ok"] is False and doc["error"] == "usage"
    assert ("--bogus" if extra else "QUOTE_FILE") in doc["detail"]
    # without --json argparse's own usage and error line, as before
    done = subprocess.run([sys.executable, "-m", "eecp", "verify-quote"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: eecp verify-quote")
    assert "eecp verify-quote: error: the following arguments are required: QUOTE_FILE" \
        in done.stderr


async def test_a_failing_pccs_is_reported_once_as_json(tmp_path: Path,
                                                       pki: devpki.DevPki) -> None:
    from tests.fake_pccs import open_fake_pccs

    minted = qf.mint_uptodate(pki, now=NOW)
    quote, _, root = write_minted(tmp_path, minted, pki)
    async with open_fake_pccs(minted.collateral_json) as pccs:
        command = [sys.executable, "-m", "eecp", "verify-quote", str(quote), "--pccs", pccs.url,
                   "--root-ca", str(root), "--at", "2026-09-22T00:00:00Z"]

        async def verify(*extra: str) -> tuple[int, str, str]:
            done = await trio.run_process([*command, *extra], capture_stdout=True,
                                          capture_stderr=True, check=False)
            return done.returncode, done.stdout.decode(), done.stderr.decode()

        pccs.up = False  # every request dropped
        code, out, err = await verify("--json")
        assert code == 2 and err == ""
        doc = json.loads(out)
        assert (doc["ok"], doc["error"]) == (False, "collateral_unavailable")
        assert doc["detail"].count("PCCS unreachable") == 1 and pccs.url in doc["detail"]
        code, out, err = await verify()
        assert code == 2 and out == "" and err.count("PCCS unreachable") == 1
        assert err.count("\n") == 1

        pccs.up = True
        pccs.fail("*", 503)  # every endpoint answers 503
        code, out, err = await verify("--json")
        doc = json.loads(out)
        assert code == 2 and doc["error"] == "collateral_unavailable"
        assert doc["detail"].count("HTTP 503") == 1
        assert all(endpoint in doc["detail"] for endpoint in ("/pckcrl", "/rootcacrl", "/tcb",
                                                              "/qe/identity"))

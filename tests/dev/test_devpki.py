"""The development PKI on disk: what the dev quote provider mints with and eecp trusts."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import dcap_qvl
import pytest

from agent.providers import DevQuoteProvider
from eecp.attestation.quotes import parse_quote, platform_id
from eecp.core.config import from_env
from eecp.dev import mint as devmint
from eecp.dev import pki as devpki

NOW = 1_750_000_000.0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    pki = devpki.make_pki(seed=3)
    root = devpki.save_pki(pki, tmp_path / "pki")
    assert root == tmp_path / "pki" / "root.pem"
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(
        devpki.PKI_FILES.values())
    for name, filename in devpki.PKI_FILES.items():
        mode = stat.S_IMODE((tmp_path / "pki" / filename).stat().st_mode)
        assert mode == (0o600 if name.endswith("_key") else 0o644), filename

    loaded = devpki.load_pki(tmp_path / "pki")
    assert loaded.root_der == pki.root_der
    assert loaded.pck_ca_pem == pki.pck_ca_pem and loaded.tcb_pem == pki.tcb_pem
    # a quote minted with the loaded keys verifies under the saved root
    minted = devmint.mint_tdx_quote(loaded, now=NOW)
    root_der = devpki.load_pki(tmp_path / "pki").root_der
    report = dcap_qvl.verify_with_root_ca(minted.quote, minted.collateral, root_der,
                                          minted.now_secs)
    assert report.status == "UpToDate"


def test_root_pem_is_what_eecp_takes_as_its_root(tmp_path: Path) -> None:
    root = devpki.save_pki(devpki.make_pki(seed=4), tmp_path / "pki")
    assert from_env({"EE_DCAP_ROOT_CA": str(root)}).dcap_root_ca == root


def test_ensure_pki_creates_once_then_reuses(tmp_path: Path) -> None:
    first = devpki.ensure_pki(tmp_path / "a" / "b")
    again = devpki.ensure_pki(tmp_path / "a" / "b")
    assert again.root_der == first.root_der
    assert devpki.ensure_pki(tmp_path / "other").root_der != first.root_der


def test_load_refuses_mixed_up_directories(tmp_path: Path) -> None:
    devpki.save_pki(devpki.make_pki(seed=5), tmp_path / "one")
    devpki.save_pki(devpki.make_pki(seed=6), tmp_path / "two")
    shutil.copy(tmp_path / "two" / "tcb.key.pem", tmp_path / "one" / "tcb.key.pem")
    with pytest.raises(ValueError, match="does not match"):
        devpki.load_pki(tmp_path / "one")
    (tmp_path / "two" / "root.key.pem").unlink()
    with pytest.raises(FileNotFoundError):
        devpki.load_pki(tmp_path / "two")


async def test_a_dev_platform_keeps_one_ppid_across_quotes_providers_and_restarts(
        tmp_path: Path) -> None:
    # a real TDX host presents one PCK leaf (one PPID) in all its quotes; the dev provider's
    # platform must too, or no node binding survives a re-attestation (ledger spec §21.11)
    def ppid(raw: bytes) -> str | None:
        facts = parse_quote(raw)
        return platform_id(facts.pck_chain, facts.fmspc)

    first = DevQuoteProvider(tmp_path / "pki")
    one, two = ppid(await first.quote(bytes(64))), ppid(await first.quote(bytes(64)))
    restarted = ppid(await DevQuoteProvider(tmp_path / "pki").quote(bytes(64)))
    other = ppid(await DevQuoteProvider(tmp_path / "pki", platform="second").quote(bytes(64)))
    assert one == two == restarted == devpki.platform_ppid(first.pck_key).hex()
    assert other is not None and other != one
    key_file = tmp_path / "pki" / devpki.PLATFORMS_DIR / "default.key.pem"
    assert key_file.stat().st_mode & 0o077 == 0  # a private key: the owner's only
    with pytest.raises(ValueError):
        devpki.platform_pck_key(tmp_path / "pki", "../escape")

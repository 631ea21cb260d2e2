"""The operator's examples: ``examples/eecp.service`` (the hardened ``Type=notify`` unit,
checked by ``systemd-analyze verify`` when it is installed) and ``examples/alerts.yml`` (checked
by ``promtool check rules`` when Prometheus is installed; every metric it names is one eecp
exports)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "examples" / "eecp.service"
ALERTS = ROOT / "examples" / "alerts.yml"


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's ``[Section]`` -> its ``Key=value`` lines in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a key outside any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def test_the_unit_is_hardened_and_uses_notify() -> None:
    service = unit_sections(UNIT.read_text())["Service"]
    keys = dict(service)
    assert {k: keys.get(k) for k in (
        "Type", "NotifyAccess", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
        "PrivateTmp", "StateDirectory", "LimitNOFILE", "User")} == {
        "Type": "notify", "NotifyAccess": "main", "NoNewPrivileges": "true",
        "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
        "StateDirectory": "eecp", "LimitNOFILE": "65536", "User": "eecp"}
    assert int(keys["WatchdogSec"]) > 0
    env = dict(v.split("=", 1) for k, v in service if k == "Environment")
    assert env["EE_DB_PATH"].startswith("/var/lib/eecp/")  # the state directory
    # every listener on loopback (the auth listener is by default), behind the front proxy
    assert env["EE_CONTROL_BIND"] == env["EE_PROXY_BIND"] == "127.0.0.1"
    assert "EE_AUTH_BIND" not in env
    # the unit's AF_UNIX is what the notify socket needs
    assert "AF_UNIX" in keys["RestrictAddressFamilies"].split()


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd): the unit is not verified")
    eecp = Path(sys.executable).parent / "eecp"  # ExecStart must name an executable here
    assert eecp.exists()
    unit = tmp_path / "eecp.service"
    unit.write_text(UNIT.read_text().replace("/opt/eecp/.venv/bin/eecp", str(eecp)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # an unknown key or a bad value is only a warning on stderr: none is allowed
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_promtool_checks_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus): examples/alerts.yml is "
                    "not checked")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_the_rules_name_only_metrics_eecp_exports() -> None:
    exported = (ROOT / "eecp" / "core" / "metrics.py").read_text()
    named = set(re.findall(r"\beecp_[a-z_]+", "\n".join(
        line for line in ALERTS.read_text().splitlines() if "expr:" in line)))
    assert named >= {"eecp_collateral_next_update_timestamp_seconds",
                     "eecp_app_attestation_age_seconds", "eecp_registrations", "eecp_store_up",
                     "eecp_ledger_invariant_ok"}
    assert {name for name in named if f'"{name}"' not in exported} == set()

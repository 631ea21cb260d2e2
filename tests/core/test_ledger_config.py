"""The ledger's configuration (spec §5, §16, §21.10, §21.13): read only with the ledger on,
fail-closed tokens, every variable parsed and a bad one named, ``eecp serve`` exiting 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eecp.core.config import Config, from_env
from eecp.core.errors import ConfigError
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.availability import Policy
from eecp.ledger.periods import DAY, HOUR, PeriodLength

ADMIN, LAUNCHER, UPTIME = "A" * 32, "L" * 32, "U" * 32
ON = {"EE_LEDGER_ENABLED": "true", "EE_ADMIN_TOKEN": ADMIN}
ROOT = Path(__file__).resolve().parents[2]


def settings(**env: str) -> LedgerSettings:
    return LedgerSettings.from_config(from_env({**ON, **env}))


def test_off_by_default_and_then_no_ledger_variable_is_read() -> None:
    cfg = from_env({"EE_LEDGER_PERIOD": "fortnight", "EE_SETTLEMENT_DELAY_SEC": "-1",
                    "EE_ADMIN_TOKEN": "short"})
    assert cfg.ledger_enabled is False
    assert cfg == Config(admin_token="short")  # nothing else changed, nothing refused
    assert from_env({"EE_LEDGER_ENABLED": "false"}) == Config()


def test_the_defaults_are_the_documented_ones() -> None:
    got = settings()
    assert got == LedgerSettings()
    assert (got.period, got.max_amount_micros, got.fee_bps) == (HOUR, 10**12, 0)
    assert (got.settlement_delay_sec, got.usage_max_age_sec) == (600, 604_800)
    assert got.policy == Policy(reconnect_grace_sec=120, gap_tolerance_sec=60, beat_sec=10,
                                app_health_counts=False, downtime_grace_sec=0,
                                gap_policy="hold")
    assert (got.price_increase_notice_sec, got.stake_min_micros) == (86_400, 1_000_000)
    assert (got.abuse_deadline_sec, got.abuse_max_span_sec) == (259_200, 604_800)
    assert got.idempotency_retention_days == 30
    assert (got.unstake_cooldown_sec, got.slash_min_interval_sec) == (604_800, 86_400)
    assert got.route_price_band_pct == 10
    assert from_env(ON).settlement_auto is True


def test_every_variable_is_read() -> None:
    cfg = from_env({**ON, "EE_LEDGER_PERIOD": "300", "EE_LEDGER_MAX_AMOUNT_USD": "5000.5",
                    "EE_PLATFORM_FEE_BPS": "250", "EE_SETTLEMENT_AUTO": "false",
                    "EE_SETTLEMENT_DELAY_SEC": "30", "EE_SETTLEMENT_DOWNTIME_GRACE_SEC": "2",
                    "EE_SETTLEMENT_RECONNECT_GRACE_SEC": "40",
                    "EE_SETTLEMENT_APP_HEALTH_COUNTS": "true",
                    "EE_SETTLEMENT_GAP_POLICY": "refund", "EE_OBSERVER_BEAT_SEC": "3",
                    "EE_OBSERVER_GAP_TOLERANCE_SEC": "20", "EE_USAGE_MAX_AGE_SEC": "3600",
                    "EE_PRICE_INCREASE_NOTICE_SEC": "0", "EE_STAKE_MIN_USD": "0",
                    "EE_ABUSE_DECISION_DEADLINE_SEC": "100", "EE_ABUSE_MAX_SPAN_SEC": "600",
                    "EE_IDEMPOTENCY_RETENTION_DAYS": "2", "EE_UNSTAKE_COOLDOWN_SEC": "120",
                    "EE_SLASH_MIN_INTERVAL_SEC": "0", "EE_ROUTE_PRICE_BAND_PCT": "25"})
    assert cfg.settlement_auto is False
    got = LedgerSettings.from_config(cfg)
    assert got.period == PeriodLength(300, "seconds")
    assert (got.max_amount_micros, got.fee_bps) == (5_000_500_000, 250)
    assert got.policy == Policy(reconnect_grace_sec=40, gap_tolerance_sec=20, beat_sec=3,
                                app_health_counts=True, downtime_grace_sec=2,
                                gap_policy="refund")
    assert (got.settlement_delay_sec, got.usage_max_age_sec) == (30, 3600)
    assert (got.price_increase_notice_sec, got.stake_min_micros) == (0, 0)
    assert (got.abuse_deadline_sec, got.abuse_max_span_sec) == (100, 600)
    assert got.idempotency_retention_days == 2
    assert (got.unstake_cooldown_sec, got.slash_min_interval_sec) == (120, 0)
    assert got.route_price_band_pct == 25
    assert settings(EE_LEDGER_PERIOD="day").period == DAY


@pytest.mark.parametrize(("env", "variable"), [
    ({"EE_LEDGER_ENABLED": "yes"}, "EE_LEDGER_ENABLED"),
    ({"EE_LEDGER_ENABLED": "true"}, "EE_ADMIN_TOKEN"),
    ({**ON, "EE_ADMIN_TOKEN": "x" * 31}, "EE_ADMIN_TOKEN"),
    ({**ON, "EE_UPTIME_TOKEN": "u" * 31}, "EE_UPTIME_TOKEN"),
    ({**ON, "EE_LAUNCHER_TOKEN": ADMIN}, "EE_LAUNCHER_TOKEN"),
    ({**ON, "EE_LAUNCHER_TOKEN": LAUNCHER, "EE_UPTIME_TOKEN": LAUNCHER}, "EE_UPTIME_TOKEN"),
    ({**ON, "EE_UPTIME_TOKEN": ADMIN}, "EE_UPTIME_TOKEN"),
    ({**ON, "EE_SETTLEMENT_AUTO": "maybe"}, "EE_SETTLEMENT_AUTO"),
    ({**ON, "EE_SETTLEMENT_DELAY_SEC": "-1"}, "EE_SETTLEMENT_DELAY_SEC"),
    ({**ON, "EE_SETTLEMENT_GAP_POLICY": "ignore"}, "EE_SETTLEMENT_GAP_POLICY"),
    ({**ON, "EE_OBSERVER_BEAT_SEC": "0"}, "EE_OBSERVER_BEAT_SEC"),
    ({**ON, "EE_USAGE_MAX_AGE_SEC": "nan"}, "EE_USAGE_MAX_AGE_SEC"),
    ({**ON, "EE_IDEMPOTENCY_RETENTION_DAYS": "0"}, "EE_IDEMPOTENCY_RETENTION_DAYS"),
    ({**ON, "EE_UNSTAKE_COOLDOWN_SEC": "-1"}, "EE_UNSTAKE_COOLDOWN_SEC"),
    ({**ON, "EE_SLASH_MIN_INTERVAL_SEC": "inf"}, "EE_SLASH_MIN_INTERVAL_SEC"),
    ({**ON, "EE_ROUTE_PRICE_BAND_PCT": "-5"}, "EE_ROUTE_PRICE_BAND_PCT"),
    ({**ON, "EE_ROUTE_PRICE_BAND_PCT": "2.5"}, "EE_ROUTE_PRICE_BAND_PCT"),
])
def test_a_bad_value_or_a_weak_token_names_the_variable(env: dict[str, str],
                                                        variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_env(env)
    assert caught.value.variable == variable


@pytest.mark.parametrize(("env", "variable"), [
    ({"EE_LEDGER_PERIOD": "fortnight"}, "EE_LEDGER_PERIOD"),
    ({"EE_LEDGER_PERIOD": "59"}, "EE_LEDGER_PERIOD"),
    ({"EE_LEDGER_PERIOD": "7"}, "EE_LEDGER_PERIOD"),
    ({"EE_LEDGER_PERIOD": "70"}, "EE_LEDGER_PERIOD"),  # does not divide a day
    ({"EE_LEDGER_MAX_AMOUNT_USD": "1e6"}, "EE_LEDGER_MAX_AMOUNT_USD"),
    ({"EE_PLATFORM_FEE_BPS": "10001"}, "EE_PLATFORM_FEE_BPS"),
    ({"EE_STAKE_MIN_USD": "-1"}, "EE_STAKE_MIN_USD"),
    # §21.10 / §21.13: a seconds-period must outlast the waits measured inside it
    ({"EE_LEDGER_PERIOD": "60"}, "EE_SETTLEMENT_DELAY_SEC"),
    ({"EE_LEDGER_PERIOD": "60", "EE_SETTLEMENT_DELAY_SEC": "10"},
     "EE_OBSERVER_GAP_TOLERANCE_SEC"),
    ({"EE_LEDGER_PERIOD": "120", "EE_SETTLEMENT_DELAY_SEC": "10",
      "EE_OBSERVER_GAP_TOLERANCE_SEC": "30"}, "EE_SETTLEMENT_RECONNECT_GRACE_SEC"),
])
def test_the_ledgers_own_grammars_and_constraints_name_the_variable(
        env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    assert caught.value.variable == variable


def test_a_60_second_period_with_short_waits_is_accepted() -> None:
    got = settings(EE_LEDGER_PERIOD="60", EE_SETTLEMENT_DELAY_SEC="10",
                   EE_OBSERVER_GAP_TOLERANCE_SEC="30", EE_SETTLEMENT_RECONNECT_GRACE_SEC="20")
    assert got.period == PeriodLength(60, "seconds") and got.settlement_delay_sec == 10


@pytest.mark.parametrize(("env", "variable"), [
    ({"EE_LEDGER_ENABLED": "true"}, "EE_ADMIN_TOKEN"),
    ({**ON, "EE_UPTIME_TOKEN": ADMIN}, "EE_UPTIME_TOKEN"),
    ({**ON, "EE_LEDGER_PERIOD": "61"}, "EE_LEDGER_PERIOD"),
    ({**ON, "EE_LEDGER_PERIOD": "60"}, "EE_SETTLEMENT_DELAY_SEC"),
])
def test_eecp_serve_exits_2_naming_the_variable(tmp_path: Path, env: dict[str, str],
                                                variable: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EE_")}
    done = subprocess.run(
        [sys.executable, "-m", "eecp", "serve"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**base, "EE_DB_PATH": str(tmp_path / "cp.db"),
                         "EE_CONTROL_PORT": "0", "EE_PROXY_PORT": "0", "EE_AUTH_PORT": "0",
                         **env})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"eecp: configuration error: {variable}:"), done.stderr
    assert not (tmp_path / "cp.db").exists()  # refused before anything opened

"""What the ledger's service answers, and the settings it runs under.

Every endpoint of spec §13 is one call of :class:`~eecp.ledger.service.Ledger` returning an
:class:`Answer`: an HTTP status, the exact body bytes, and whether it is a replay of a stored
answer (the HTTP layer then adds ``Idempotent-Replayed: true``). The body is rendered once, as
compact ASCII JSON, and an answer kept for idempotency is stored as that text, so a replay is
byte-identical.

Refusals reach the service as the ``LedgerError`` family (:mod:`eecp.core.errors`) and leave it
as answers: 400/413 (``LedgerInputError``: never stored), 404 and 409 (stored under a key),
403 ``not_your_node`` (:class:`Forbidden`: a node's token naming another node; never stored),
503 ``store_unavailable``; a bare ``LedgerError`` is a broken rule, logged and answered 500.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from eecp.core.config import Config
from eecp.core.errors import ConfigError, LedgerError, LedgerInputError, StoreError
from eecp.ledger.availability import GapPolicy, Policy
from eecp.ledger.money import (
    DEFAULT_MAX_AMOUNT_MICROS,
    MICROS_PER_USD,
    fee_bps_setting,
    max_amount_setting,
    parse_usd,
)
from eecp.ledger.periods import HOUR, PeriodLength, check_period_settings, period_setting

log = logging.getLogger("eecp.ledger")

ADMIN: Final = "admin"
LAUNCHER: Final = "launcher"
UPTIME: Final = "uptime"


def node_principal(node_id: str) -> str:
    return f"node:{node_id}"


@dataclass(frozen=True)
class LedgerSettings:
    """The knobs of spec §16 the service reads (the config builds it from ``EE_*``)."""

    period: PeriodLength = HOUR  # EE_LEDGER_PERIOD
    max_amount_micros: int = DEFAULT_MAX_AMOUNT_MICROS  # EE_LEDGER_MAX_AMOUNT_USD
    fee_bps: int = 0  # EE_PLATFORM_FEE_BPS
    settlement_delay_sec: float = 600.0  # EE_SETTLEMENT_DELAY_SEC
    policy: Policy = field(default_factory=Policy)  # the EE_SETTLEMENT_* / EE_OBSERVER_* knobs
    usage_max_age_sec: float = 604_800.0  # EE_USAGE_MAX_AGE_SEC
    price_increase_notice_sec: float = 86_400.0  # EE_PRICE_INCREASE_NOTICE_SEC
    stake_min_micros: int = MICROS_PER_USD  # EE_STAKE_MIN_USD
    #: whether a node-period needs the tier's minimum stake (§9.2 ``stake_missing`` /
    #: ``stake_below_minimum``); False runs the spec's phase 1, a ledger without stake
    require_stake: bool = True
    unstake_cooldown_sec: float = 604_800.0  # EE_UNSTAKE_COOLDOWN_SEC
    slash_min_interval_sec: float = 86_400.0  # EE_SLASH_MIN_INTERVAL_SEC
    route_price_band_pct: int = 10  # EE_ROUTE_PRICE_BAND_PCT (the proxy's pick, §12)
    abuse_deadline_sec: float = 259_200.0  # EE_ABUSE_DECISION_DEADLINE_SEC
    abuse_max_span_sec: float = 604_800.0  # EE_ABUSE_MAX_SPAN_SEC
    idempotency_retention_days: float = 30.0  # EE_IDEMPOTENCY_RETENTION_DAYS
    agent_stale_sec: float = 86_400.0  # EE_AGENT_STALE_SEC (§8.4)
    settle_interval_sec: float = 60.0  # how often the settler runs
    settle_batch: int = 200  # node-periods per settler pass (§15)
    #: node-periods measured per unit of work when a finalize catches up on a chain
    measure_batch: int = 50
    #: matured unstakes the releaser handles per pass (§15, each in its own unit of work)
    release_batch: int = 200

    @classmethod
    def from_config(cls, config: Config) -> LedgerSettings:
        """The settings of ``config`` (its ``EE_*`` ledger variables), in the ledger's own
        grammars; ``ConfigError`` naming the first variable that cannot be used, including the
        waits a seconds-period must exceed (§21.10, §21.13)."""
        period = period_setting(config.ledger_period)
        check_period_settings(period, settlement_delay_sec=config.settlement_delay_sec,
                              gap_tolerance_sec=config.observer_gap_tolerance_sec,
                              reconnect_grace_sec=config.settlement_reconnect_grace_sec)
        gap_policy: GapPolicy = "hold"
        for choice in ("hold", "pay", "refund"):
            if config.settlement_gap_policy == choice:
                gap_policy = choice
        return cls(
            period=period,
            max_amount_micros=max_amount_setting(config.ledger_max_amount_usd),
            fee_bps=fee_bps_setting(config.platform_fee_bps),
            settlement_delay_sec=config.settlement_delay_sec,
            policy=Policy(reconnect_grace_sec=config.settlement_reconnect_grace_sec,
                          gap_tolerance_sec=config.observer_gap_tolerance_sec,
                          beat_sec=config.observer_beat_sec,
                          app_health_counts=config.settlement_app_health_counts,
                          downtime_grace_sec=config.settlement_downtime_grace_sec,
                          gap_policy=gap_policy),
            usage_max_age_sec=config.usage_max_age_sec,
            price_increase_notice_sec=config.price_increase_notice_sec,
            stake_min_micros=_stake_min(config.stake_min_usd),
            unstake_cooldown_sec=config.unstake_cooldown_sec,
            slash_min_interval_sec=config.slash_min_interval_sec,
            route_price_band_pct=config.route_price_band_pct,
            abuse_deadline_sec=config.abuse_decision_deadline_sec,
            abuse_max_span_sec=config.abuse_max_span_sec,
            idempotency_retention_days=config.idempotency_retention_days,
            agent_stale_sec=config.agent_stale_sec,
        )


def _stake_min(raw: str) -> int:
    """``EE_STAKE_MIN_USD``: a USD amount (0 allowed: no floor) to micros, or ConfigError."""
    try:
        return parse_usd(raw.strip(), "EE_STAKE_MIN_USD", allow_zero=True, cap_micros=None)
    except LedgerInputError as exc:
        raise ConfigError("EE_STAKE_MIN_USD",
                          f"{raw!r} is not a USD amount ({exc.detail})") from None


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: write ``status`` and ``body`` (``application/json``); ``replayed``
    answers carry ``Idempotent-Replayed: true``. ``stored`` is what an idempotency key keeps
    when it differs from what is sent (a register's answer without its token)."""

    status: int
    body: bytes
    replayed: bool = False
    stored: bytes | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def headers(self) -> list[tuple[str, str]]:
        headers = [("Content-Type", "application/json")]
        if self.replayed:
            headers.append(("Idempotent-Replayed", "true"))
        return headers


def render(doc: object) -> bytes:
    """A body as compact ASCII JSON (key order as built: upstream's fields first)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def ok(doc: object, status: int = 200) -> Answer:
    return Answer(status, render(doc))


class Forbidden(Exception):
    """403 for a principal the endpoint admits but not for this node (a node token naming
    another node): ``{"error": "forbidden", "reason": ...}``, never stored."""

    def __init__(self, reason: str = "not_your_node") -> None:
        super().__init__(reason)
        self.reason = reason


def check_node_principal(principal: str, node_id: str) -> None:
    """A node's principal may act only on its own node; every role passes."""
    if principal.startswith("node:") and principal != node_principal(node_id):
        raise Forbidden()


def error_answer(exc: BaseException) -> Answer:
    """The answer for a refusal the service caught (see the module docstring)."""
    if isinstance(exc, Forbidden):
        return Answer(403, render({"error": "forbidden", "reason": exc.reason}))
    if isinstance(exc, StoreError):
        log.warning("ledger: the store failed: %s", exc)
        return Answer(503, render({"error": "store_unavailable"}))
    if isinstance(exc, LedgerError) and exc.http_status != 500:
        return Answer(exc.http_status, render(exc.body()))
    log.error("ledger: a rule broke (a bug): %r", exc)
    return Answer(500, render({"error": "internal_error"}))

"""Configuration: one frozen ``Config`` built once from a mapping (normally ``os.environ``).

Every ``EE_*`` variable eecp reads is declared here, with its default; the README's
configuration table mirrors this module. A bad value raises ``ConfigError`` naming the variable,
which ``eecp serve`` turns into one line on stderr and exit status 2.

The ledger's variables (spec §16) are read only when ``EE_LEDGER_ENABLED=true``: with the
ledger off eecp reads, and so behaves, exactly as without it. Its role tokens then fail closed:
the admin token is required (at least :data:`MIN_LEDGER_TOKEN_CHARS` characters, as is any
role token that is set) and no two role tokens may be equal, because a token is how a request
is told apart from another role's. The ledger's own grammars (``EE_LEDGER_PERIOD``, the USD
amounts, ``EE_PLATFORM_FEE_BPS``) are parsed by :meth:`eecp.ledger.answers.LedgerSettings
.from_config`, once at start-up, with the same ``ConfigError``: the core sits below the
ledger and keeps their text.

Three variables are systemd's, not eecp's: ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID`` (``Type=notify`` and ``WatchdogSec``, :mod:`eecp.core.sdnotify`). They are read
here, from the same mapping, rather than from ``os.environ`` where they are used, so that a test
(or ``eecp demo``) hands them to ``serve()`` as it hands any setting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from eecp.core import sdnotify
from eecp.core.errors import ConfigError

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PCCS_URL = "https://api.trustedservices.intel.com"
DEFAULT_NETWORKS = "forge-1:sealed,sandbox-1:open"
KNOWN_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "TDRelaunchAdvised",
        "TDRelaunchAdvisedConfigurationNeeded",
    }
)
#: EE_TRUSTED_PROXIES' default: the front proxy on the same host
DEFAULT_TRUSTED = "127.0.0.0/8,::1/128"
#: the shortest role token eecp starts with when the ledger is on (spec §5)
MIN_LEDGER_TOKEN_CHARS = 32
_NETWORK_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Network:
    """A network agents may join; ``sealed`` networks refuse unsealed nodes."""

    name: str
    sealed: bool


@dataclass(frozen=True)
class Config:
    """Everything eecp is configured with. Build it with :func:`from_env`."""

    control_bind: str = "0.0.0.0"
    control_port: int = 8088
    proxy_bind: str = "0.0.0.0"
    proxy_port: int = 9090
    db_path: Path = Path("data/control-plane.db")
    db_url: str | None = None
    networks: tuple[Network, ...] = (Network("forge-1", True), Network("sandbox-1", False))
    allowlist_asset: str = "agent-attestation-allowlist.json"
    allowlist_dir: Path | None = None
    allowlist_cache_ttl_sec: float = 300.0
    allowlist_fetches_per_min: int = 30
    allowlist_fetches_per_platform_per_min: int = 6
    github_api_url: str = "https://api.github.com"
    github_token: str | None = field(default=None, repr=False)
    pccs_url: str = DEFAULT_PCCS_URL
    pccs_timeout_sec: float = 10.0
    collateral_refresh_margin_sec: float = 3600.0
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate", "SWHardeningNeeded"})
    dcap_root_ca: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    launcher_token: str | None = field(default=None, repr=False)
    uptime_token: str | None = field(default=None, repr=False)
    attest_interval_sec: float = 3600.0
    attest_deadline_sec: float = 30.0
    health_timeout_sec: float = 120.0
    registration_ttl_days: float = 30.0
    registration_warn_days: float = 3.0
    log_format: str = "text"
    log_level: str = "INFO"
    access_log: bool = True
    shutdown_grace_sec: float = 5.0
    verify_workers: int = 2
    store_workers: int = 0  # 0: automatic (1 for SQLite, which has one writer; 4 for PostgreSQL)
    tunnel_max_message_bytes: int = 1024 * 1024
    tunnel_ping_interval_sec: float = 10.0
    tunnel_dead_peer_sec: float = 20.0
    audit_entries_shown: int = 20
    audit_refusals_per_min: int = 60
    auth_bind: str = "127.0.0.1"
    auth_port: int = 8089
    proxy_timeout_sec: float = 60.0
    proxy_send_timeout_sec: float = 60.0
    proxy_ws_idle_sec: float = 600.0
    proxy_max_body_bytes: int | None = None
    proxy_min_rate_bytes_sec: int = 1024
    proxy_rate_grace_sec: float = 10.0
    proxy_max_streams_per_client: int = 16
    proxy_slot_reserve: int = 10
    proxy_json_buffer_bytes: int = 64 * 1024 * 1024
    proxy_api_token: str | None = field(default=None, repr=False)
    proxy_expose_agent: bool = False
    tunnel_max_streams: int = 100
    stream_window_bytes: int = 256 * 1024
    # None: a share of what the file limit leaves (eecp.capacity.listener_caps)
    control_max_connections: int | None = None
    proxy_max_connections: int | None = None
    auth_max_connections: int | None = None
    trusted_proxies: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                              ipaddress.ip_network("::1/128"))
    # systemd's variables, not settings (Type=notify, WatchdogSec: eecp.core.sdnotify)
    notify_socket: str | None = None  # NOTIFY_SOCKET as a socket address
    watchdog_usec: int = 0  # WATCHDOG_USEC (0: no watchdog)
    watchdog_pid: int | None = None  # WATCHDOG_PID (the watchdog is another process's)
    # the ledger (spec §16), read only when ledger_enabled
    ledger_enabled: bool = False
    #: the text of EE_LEDGER_PERIOD / EE_LEDGER_MAX_AMOUNT_USD / EE_PLATFORM_FEE_BPS /
    #: EE_STAKE_MIN_USD: their grammars are the ledger's (LedgerSettings.from_config)
    ledger_period: str = "hour"
    ledger_max_amount_usd: str = "1000000"
    platform_fee_bps: str = "0"
    stake_min_usd: str = "1"
    unstake_cooldown_sec: float = 604_800.0
    slash_min_interval_sec: float = 86_400.0
    route_price_band_pct: int = 10
    settlement_auto: bool = True
    settlement_delay_sec: float = 600.0
    settlement_downtime_grace_sec: float = 0.0
    settlement_reconnect_grace_sec: float = 120.0
    settlement_app_health_counts: bool = False
    settlement_gap_policy: str = "hold"
    observer_beat_sec: float = 10.0
    observer_gap_tolerance_sec: float = 60.0
    usage_max_age_sec: float = 604_800.0
    price_increase_notice_sec: float = 86_400.0
    abuse_decision_deadline_sec: float = 259_200.0
    abuse_max_span_sec: float = 604_800.0
    idempotency_retention_days: float = 30.0
    agent_stale_sec: float = 86_400.0

    @property
    def store_threads(self) -> int:
        """Worker threads for the store: more than one only helps a server database (a SQLite
        file has one writer at a time; extra threads just contend for the GIL)."""
        if self.store_workers:
            return self.store_workers
        return 4 if self.db_url and self.db_url.startswith("postgres") else 1

    def network(self, name: str) -> Network | None:
        """The configured network called ``name``, or None."""
        for net in self.networks:
            if net.name == name:
                return net
        return None


def from_env(env: Mapping[str, str]) -> Config:
    """Build a ``Config`` from ``env``; unset or empty variables take their defaults.

    Raises ``ConfigError`` naming the first variable whose value cannot be used.
    """
    r = _Reader(env)
    cfg = Config(
        control_bind=r.get("EE_CONTROL_BIND", "0.0.0.0", _host),
        control_port=r.get("EE_CONTROL_PORT", 8088, _port),
        proxy_bind=r.get("EE_PROXY_BIND", "0.0.0.0", _host),
        proxy_port=r.get("EE_PROXY_PORT", 9090, _port),
        db_path=r.get("EE_DB_PATH", Path("data/control-plane.db"), Path),
        db_url=r.get("EE_DB_URL", None, _db_url),
        networks=r.get("EE_NETWORKS", _networks(DEFAULT_NETWORKS), _networks),
        allowlist_asset=r.get("EE_ALLOWLIST_ASSET", "agent-attestation-allowlist.json", _asset),
        allowlist_dir=r.get("EE_ALLOWLIST_DIR", None, _existing_dir),
        allowlist_cache_ttl_sec=r.get("EE_ALLOWLIST_CACHE_TTL_SEC", 300.0, _non_negative),
        allowlist_fetches_per_min=r.get("EE_ALLOWLIST_FETCHES_PER_MIN", 30, _whole),
        allowlist_fetches_per_platform_per_min=r.get(
            "EE_ALLOWLIST_FETCHES_PER_PLATFORM_PER_MIN", 6, _whole),
        github_api_url=r.get("EE_GITHUB_API_URL", "https://api.github.com", _http_url),
        github_token=r.get("EE_GITHUB_TOKEN", None, str),
        pccs_url=r.get("EE_PCCS_URL", DEFAULT_PCCS_URL, _http_url),
        pccs_timeout_sec=r.get("EE_PCCS_TIMEOUT_SEC", 10.0, _positive),
        collateral_refresh_margin_sec=r.get(
            "EE_COLLATERAL_REFRESH_MARGIN_SEC", 3600.0, _non_negative
        ),
        allowed_tcb_statuses=r.get(
            "EE_ALLOWED_TCB_STATUSES", frozenset({"UpToDate", "SWHardeningNeeded"}), tcb_statuses
        ),
        dcap_root_ca=r.get("EE_DCAP_ROOT_CA", None, _readable_file),
        admin_token=r.get("EE_ADMIN_TOKEN", None, str),
        launcher_token=r.get("EE_LAUNCHER_TOKEN", None, str),
        uptime_token=r.get("EE_UPTIME_TOKEN", None, str),
        attest_interval_sec=r.get("EE_ATTEST_INTERVAL_SEC", 3600.0, _positive),
        attest_deadline_sec=r.get("EE_ATTEST_DEADLINE_SEC", 30.0, _positive),
        health_timeout_sec=r.get("EE_HEALTH_TIMEOUT_SEC", 120.0, _positive),
        registration_ttl_days=r.get("EE_REGISTRATION_TTL_DAYS", 30.0, _positive),
        registration_warn_days=r.get("EE_REGISTRATION_WARN_DAYS", 3.0, _non_negative),
        log_format=r.get("EE_LOG_FORMAT", "text", _choice("text", "json")),
        log_level=r.get("EE_LOG_LEVEL", "INFO", _log_level),
        access_log=r.get("EE_ACCESS_LOG", True, _on_off),
        shutdown_grace_sec=r.get("EE_SHUTDOWN_GRACE_SEC", 5.0, _non_negative),
        verify_workers=r.get("EE_VERIFY_WORKERS", 2, _positive_int),
        store_workers=r.get("EE_STORE_WORKERS", 0, _positive_int),
        tunnel_max_message_bytes=r.get("EE_TUNNEL_MAX_MESSAGE_BYTES", 1024 * 1024,
                                       _positive_int),
        tunnel_ping_interval_sec=r.get("EE_TUNNEL_PING_INTERVAL_SEC", 10.0, _non_negative),
        tunnel_dead_peer_sec=r.get("EE_TUNNEL_DEAD_PEER_SEC", 20.0, _positive),
        audit_entries_shown=r.get("EE_ADMIN_AUDIT_ENTRIES", 20, _positive_int),
        audit_refusals_per_min=r.get("EE_AUDIT_REFUSALS_PER_MIN", 60, _whole),
        auth_bind=r.get("EE_AUTH_BIND", "127.0.0.1", _host),
        auth_port=r.get("EE_AUTH_PORT", 8089, _port),
        proxy_timeout_sec=r.get("EE_PROXY_TIMEOUT_SEC", 60.0, _positive),
        proxy_send_timeout_sec=r.get("EE_PROXY_SEND_TIMEOUT_SEC", 60.0, _positive),
        proxy_ws_idle_sec=r.get("EE_PROXY_WS_IDLE_SEC", 600.0, _positive),
        proxy_max_body_bytes=r.get("EE_PROXY_MAX_BODY_BYTES", None, _positive_int),
        proxy_min_rate_bytes_sec=r.get("EE_PROXY_MIN_RATE_BYTES_SEC", 1024, _whole),
        proxy_rate_grace_sec=r.get("EE_PROXY_RATE_GRACE_SEC", 10.0, _positive),
        proxy_max_streams_per_client=r.get("EE_PROXY_MAX_STREAMS_PER_CLIENT", 16, _whole),
        proxy_slot_reserve=r.get("EE_PROXY_SLOT_RESERVE", 10, _whole),
        proxy_json_buffer_bytes=r.get("EE_PROXY_JSON_BUFFER_BYTES", 64 * 1024 * 1024,
                                      _positive_int),
        proxy_api_token=r.get("EE_PROXY_API_TOKEN", None, str),
        proxy_expose_agent=r.get("EE_PROXY_EXPOSE_AGENT", False, _bool),
        tunnel_max_streams=r.get("EE_TUNNEL_MAX_STREAMS", 100, _positive_int),
        stream_window_bytes=r.get("EE_STREAM_WINDOW_BYTES", 256 * 1024, _positive_int),
        control_max_connections=r.get("EE_CONTROL_MAX_CONNECTIONS", None, _positive_int),
        proxy_max_connections=r.get("EE_PROXY_MAX_CONNECTIONS", None, _positive_int),
        auth_max_connections=r.get("EE_AUTH_MAX_CONNECTIONS", None, _positive_int),
        trusted_proxies=r.get("EE_TRUSTED_PROXIES", parse_trusted(DEFAULT_TRUSTED),
                              parse_trusted),
        notify_socket=r.get("NOTIFY_SOCKET", None, sdnotify.parse_address),
        watchdog_usec=r.get("WATCHDOG_USEC", 0, _whole),
        watchdog_pid=r.get("WATCHDOG_PID", None, _positive_int),
    )
    if cfg.registration_warn_days >= cfg.registration_ttl_days:
        raise ConfigError(
            "EE_REGISTRATION_WARN_DAYS", "must be smaller than EE_REGISTRATION_TTL_DAYS"
        )
    if r.get("EE_LEDGER_ENABLED", False, _bool):
        cfg = _with_ledger(r, cfg)
    return cfg


def _with_ledger(r: _Reader, cfg: Config) -> Config:
    """``cfg`` with the ledger on: its variables read, its tokens checked (spec §5, §16)."""
    _check_ledger_tokens(cfg)
    return replace(
        cfg,
        ledger_enabled=True,
        ledger_period=r.get("EE_LEDGER_PERIOD", "hour", str),
        ledger_max_amount_usd=r.get("EE_LEDGER_MAX_AMOUNT_USD", "1000000", str),
        platform_fee_bps=r.get("EE_PLATFORM_FEE_BPS", "0", str),
        stake_min_usd=r.get("EE_STAKE_MIN_USD", "1", str),
        unstake_cooldown_sec=r.get("EE_UNSTAKE_COOLDOWN_SEC", 604_800.0, _non_negative),
        slash_min_interval_sec=r.get("EE_SLASH_MIN_INTERVAL_SEC", 86_400.0, _non_negative),
        route_price_band_pct=r.get("EE_ROUTE_PRICE_BAND_PCT", 10, _whole),
        settlement_auto=r.get("EE_SETTLEMENT_AUTO", True, _bool),
        settlement_delay_sec=r.get("EE_SETTLEMENT_DELAY_SEC", 600.0, _non_negative),
        settlement_downtime_grace_sec=r.get("EE_SETTLEMENT_DOWNTIME_GRACE_SEC", 0.0,
                                            _non_negative),
        settlement_reconnect_grace_sec=r.get("EE_SETTLEMENT_RECONNECT_GRACE_SEC", 120.0,
                                             _non_negative),
        settlement_app_health_counts=r.get("EE_SETTLEMENT_APP_HEALTH_COUNTS", False, _bool),
        settlement_gap_policy=r.get("EE_SETTLEMENT_GAP_POLICY", "hold",
                                    _choice("hold", "pay", "refund")),
        observer_beat_sec=r.get("EE_OBSERVER_BEAT_SEC", 10.0, _positive),
        observer_gap_tolerance_sec=r.get("EE_OBSERVER_GAP_TOLERANCE_SEC", 60.0, _non_negative),
        usage_max_age_sec=r.get("EE_USAGE_MAX_AGE_SEC", 604_800.0, _positive),
        price_increase_notice_sec=r.get("EE_PRICE_INCREASE_NOTICE_SEC", 86_400.0,
                                        _non_negative),
        abuse_decision_deadline_sec=r.get("EE_ABUSE_DECISION_DEADLINE_SEC", 259_200.0,
                                          _non_negative),
        abuse_max_span_sec=r.get("EE_ABUSE_MAX_SPAN_SEC", 604_800.0, _positive),
        idempotency_retention_days=r.get("EE_IDEMPOTENCY_RETENTION_DAYS", 30.0, _positive),
        agent_stale_sec=r.get("EE_AGENT_STALE_SEC", 86_400.0, _positive),
    )


def _check_ledger_tokens(cfg: Config) -> None:
    """The ledger moves money: every role token it accepts must be strong and its own."""
    tokens = {"EE_ADMIN_TOKEN": cfg.admin_token, "EE_LAUNCHER_TOKEN": cfg.launcher_token,
              "EE_UPTIME_TOKEN": cfg.uptime_token}
    if not cfg.admin_token:
        raise ConfigError("EE_ADMIN_TOKEN", "is required when EE_LEDGER_ENABLED=true")
    for name, token in tokens.items():
        if token and len(token) < MIN_LEDGER_TOKEN_CHARS:
            raise ConfigError(name, f"must be at least {MIN_LEDGER_TOKEN_CHARS} characters "
                              "when EE_LEDGER_ENABLED=true")
    names = [name for name, token in tokens.items() if token]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if tokens[first] == tokens[second]:
                raise ConfigError(second, f"must differ from {first}: a token names one role")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._env.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ConfigError:
            raise
        except (ValueError, OSError) as exc:
            raise ConfigError(name, str(exc) or "invalid value") from None


def _port(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"{raw!r} is not a port number")
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is outside 0..65535")
    return port


def _host(raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", raw):
            raise ValueError(f"{raw!r} is neither an IP address nor a host name") from None
    return raw


def _positive(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{raw!r} must be a positive number")
    return value


def _non_negative(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{raw!r} must be a number >= 0")
    return value


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{raw!r} must be a whole number >= 1")
    return int(raw)


def _whole(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"{raw!r} must be a whole number >= 0")
    return int(raw)


def _http_url(raw: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", raw):
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def _db_url(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://", "sqlite:///")):
        raise ValueError("must start with postgresql:// (or sqlite:///path)")
    return raw


def _asset(raw: str) -> str:
    if "/" in raw or raw in (".", ".."):
        raise ValueError(f"{raw!r} must be a plain file name")
    return raw


def _existing_dir(raw: str) -> Path:
    path = Path(raw)
    if not path.is_dir():
        raise ValueError(f"{raw} is not a directory")
    return path


def _readable_file(raw: str) -> Path:
    path = Path(raw)
    with path.open("rb") as fh:
        if not fh.read(1):
            raise ValueError(f"{raw} is empty")
    return path


def _networks(raw: str) -> tuple[Network, ...]:
    nets: list[Network] = []
    for item in raw.split(","):
        name, sep, kind = item.strip().partition(":")
        if not sep or kind not in ("sealed", "open"):
            raise ValueError(f"{item.strip()!r}: expected name:sealed or name:open")
        if not _NETWORK_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid network name")
        if any(n.name == name for n in nets):
            raise ValueError(f"network {name!r} listed twice")
        nets.append(Network(name, kind == "sealed"))
    return tuple(nets)


def parse_trusted(raw: str) -> tuple[IPNetwork, ...]:
    """``EE_TRUSTED_PROXIES``: comma-separated addresses or CIDR networks, or ``none``.

    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) also yields its IPv4 form, since
    peers are compared unmapped. Raises ValueError naming the first unusable item."""
    if raw.strip().lower() == "none":
        return ()
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if "%" in item:
            raise ValueError(f"{item!r}: scoped addresses (%zone) are not supported")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is neither an IP address nor a CIDR network") from None
        networks.append(network)
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            networks.append(ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}"))
    if not networks:
        raise ValueError("no address given (use 'none' to trust no proxy)")
    return tuple(networks)


def tcb_statuses(raw: str) -> frozenset[str]:
    """Parse a comma-separated TCB status list (also used by ``eecp verify-quote``)."""
    statuses = frozenset(s.strip() for s in raw.split(",") if s.strip())
    unknown = sorted(statuses - KNOWN_TCB_STATUSES)
    if unknown:
        raise ValueError(f"unknown TCB status {', '.join(unknown)}")
    if not statuses:
        raise ValueError("no TCB status given")
    return statuses


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value not in ("true", "false"):
        raise ValueError(f"{raw!r} is not true or false")
    return value == "true"


def _on_off(raw: str) -> bool:
    value = raw.lower()
    if value not in ("on", "off"):
        raise ValueError(f"{raw!r} is not on or off")
    return value == "on"


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return raw

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{raw!r} is not DEBUG, INFO, WARNING or ERROR")
    return level

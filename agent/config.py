"""The agent's configuration: one frozen :class:`AgentConfig` built once from the environment.

Every variable the agent reads is declared here with its default (the README's agent table
mirrors this module). A bad value raises :class:`~eecp.core.errors.ConfigError` naming the variable;
``eecp-agent`` turns that into one line on stderr and exit status 2.

The register fields are validated by eecp's own decoder (:mod:`eecp.wire.protocol`), so an agent
never starts with a repo, tag, app name, network or id that the control plane would refuse.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from eecp.core.errors import ConfigError, ProtocolError
from eecp.wire.protocol import Register, decode_agent_message, encode_register

T = TypeVar("T")

QuoteProviderName = Literal["configfs-tsm", "dev"]

#: the agent package: its directory is what ``agent_dir_sha256`` measures by default
AGENT_PACKAGE_DIR = Path(__file__).resolve().parent
#: the agent's main file: what ``agent_py_sha256`` measures by default
AGENT_MAIN_FILE = AGENT_PACKAGE_DIR / "agent.py"
DEFAULT_TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
#: where the upstream agent reads the VM image id when ``VM_IMAGE_ID`` is not set
DEFAULT_VM_IMAGE_ID_FILE = Path("/etc/easy-enclave/vm_image_id")
DEFAULT_DEV_PKI_DIR = Path("data/dev-pki")

# Which variable a register field comes from, to name it when eecp's decoder refuses the field.
_REGISTER_VARIABLES = {
    "repo": "EE_REPO",
    "release_tag": "EE_RELEASE_TAG",
    "app_name": "EE_APP_NAME",
    "network": "EE_NETWORK",
    "agent_id": "EE_AGENT_ID",
    "node_id": "EE_NODE_ID",
}
_SEAL_TRUE = frozenset({"1", "true", "yes"})  # the upstream agent's spellings of "sealed"
_SEAL_FALSE = frozenset({"0", "false", "no"})
_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent is configured with. Build it with :func:`from_env`."""

    control_ws: str
    repo: str
    release_tag: str
    app_name: str
    network: str
    agent_id: str
    #: the ledger node this TD runs on (EE_NODE_ID), named in ``register``; None: unbound
    node_id: str | None = None
    backend_url: str = "http://127.0.0.1:8080"
    health_path: str = "/health"
    #: a forwarded request's backend must make progress this often (see agent.forward)
    backend_timeout_sec: float = 60.0
    #: proxied requests served at once on one tunnel; more are refused (RESET too_many_streams)
    max_streams: int = 100
    health_interval_sec: float = 30.0
    health_probe_timeout_sec: float = 5.0
    reconnect_min_sec: float = 1.0
    reconnect_max_sec: float = 60.0
    reconnect_reset_sec: float = 60.0
    connect_timeout_sec: float = 30.0
    ping_interval_sec: float = 20.0
    dead_peer_sec: float = 30.0
    quote_provider: QuoteProviderName = "configfs-tsm"
    tsm_report_dir: Path = DEFAULT_TSM_REPORT_DIR
    dev_pki_dir: Path = DEFAULT_DEV_PKI_DIR
    # None: the dev PKI's own defaults, which only the dev quote provider knows (it alone
    # imports eecp.dev, and only when it is chosen)
    dev_mrtd: bytes | None = field(default=None, repr=False)
    dev_rtmrs: tuple[bytes, bytes, bytes, bytes] | None = field(default=None, repr=False)
    dev_fmspc: str | None = None
    agent_dir: Path = AGENT_PACKAGE_DIR
    agent_file: Path = AGENT_MAIN_FILE
    vm_image_id: str | None = None
    vm_image_id_file: Path = DEFAULT_VM_IMAGE_ID_FILE
    sealed: bool = False
    log_format: str = "text"
    log_level: str = "INFO"
    #: what the agent warns about once logging is set up (a variable read by its old name)
    warnings: tuple[str, ...] = ()

    @property
    def register(self) -> Register:
        """The ``register`` message this agent sends (again, to renew, on ``ttl_warning``)."""
        return Register(self.repo, self.release_tag, self.app_name, self.network, self.agent_id,
                        node_id=self.node_id)

    @property
    def health_url(self) -> str:
        """The URL the health probe GETs."""
        return self.backend_url.rstrip("/") + self.health_path


def from_env(env: Mapping[str, str]) -> AgentConfig:
    """Build an :class:`AgentConfig` from ``env``; unset or empty variables take defaults.

    Raises ``ConfigError`` naming the first variable whose value cannot be used. When
    ``EE_AGENT_ID`` is unset and ``EE_AGENT_ID_FILE`` names a missing file, a fresh id is
    written there (so the agent keeps its identity across restarts).
    """
    r = _Reader(env)
    control_ws = r.get("EE_CONTROL_WS", "", _ws_url) or _missing("EE_CONTROL_WS")
    register = _checked_register(
        repo=r.required("EE_REPO"),
        release_tag=r.required("EE_RELEASE_TAG"),
        app_name=r.required("EE_APP_NAME"),
        network=r.get("EE_NETWORK", "forge-1", str),
        agent_id=_agent_id(r),
        node_id=r.raw("EE_NODE_ID"),
    )
    cfg = AgentConfig(
        control_ws=control_ws,
        repo=register.repo,
        release_tag=register.release_tag,
        app_name=register.app_name,
        network=register.network,
        agent_id=register.agent_id,
        node_id=register.node_id,
        backend_url=r.get("EE_BACKEND_URL", "http://127.0.0.1:8080", _http_url),
        health_path=r.get("EE_HEALTH_PATH", "/health", _url_path),
        backend_timeout_sec=r.get("EE_BACKEND_TIMEOUT_SEC", 60.0, _positive),
        max_streams=r.get("EE_MAX_STREAMS", 100, _positive_int),
        health_interval_sec=r.get("EE_HEALTH_INTERVAL_SEC", 30.0, _positive),
        health_probe_timeout_sec=r.renamed("EE_HEALTH_PROBE_TIMEOUT_SEC",
                                           "EE_HEALTH_TIMEOUT_SEC", 5.0, _positive),
        reconnect_min_sec=r.get("EE_RECONNECT_MIN_SEC", 1.0, _positive),
        reconnect_max_sec=r.get("EE_RECONNECT_MAX_SEC", 60.0, _positive),
        reconnect_reset_sec=r.get("EE_RECONNECT_RESET_SEC", 60.0, _positive),
        connect_timeout_sec=r.get("EE_CONNECT_TIMEOUT_SEC", 30.0, _positive),
        ping_interval_sec=r.get("EE_TUNNEL_PING_INTERVAL_SEC", 20.0, _non_negative),
        dead_peer_sec=r.get("EE_TUNNEL_DEAD_PEER_SEC", 30.0, _positive),
        quote_provider=r.get("EE_QUOTE_PROVIDER", "configfs-tsm", _provider_name),
        tsm_report_dir=r.get("EE_TSM_REPORT_DIR", DEFAULT_TSM_REPORT_DIR, Path),
        dev_pki_dir=r.get("EE_DEV_PKI_DIR", DEFAULT_DEV_PKI_DIR, Path),
        dev_mrtd=r.get("EE_DEV_MRTD", None, _sha384_hex),
        dev_rtmrs=r.get("EE_DEV_RTMRS", None, _rtmrs),
        dev_fmspc=r.get("EE_DEV_FMSPC", None, _fmspc),
        agent_dir=r.get("EE_AGENT_DIR", AGENT_PACKAGE_DIR, Path),
        agent_file=r.get("EE_AGENT_FILE", AGENT_MAIN_FILE, Path),
        vm_image_id=r.get("VM_IMAGE_ID", None, str),
        vm_image_id_file=r.get("EE_VM_IMAGE_ID_FILE", DEFAULT_VM_IMAGE_ID_FILE, Path),
        sealed=r.get("SEAL_VM", False, _sealed),
        log_format=r.get("EE_LOG_FORMAT", "text", _log_format),
        log_level=r.get("EE_LOG_LEVEL", "INFO", _log_level),
        warnings=tuple(r.warnings),
    )
    if cfg.reconnect_min_sec > cfg.reconnect_max_sec:
        raise ConfigError("EE_RECONNECT_MIN_SEC", "must not exceed EE_RECONNECT_MAX_SEC")
    return cfg


class _Reader:
    """Reads one variable at a time and turns a parse failure into a ``ConfigError``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.warnings: list[str] = []

    def raw(self, name: str) -> str:
        return self._env.get(name, "").strip()

    def required(self, name: str) -> str:
        return self.raw(name) or _missing(name)

    def get(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self.raw(name)
        if not raw:
            return default
        try:
            return parse(raw)
        except ConfigError:
            raise
        except (ValueError, OSError) as exc:
            raise ConfigError(name, str(exc) or "invalid value") from None


    def renamed(self, name: str, old_name: str, default: T, parse: Callable[[str], T]) -> T:
        """``name``, or the variable's ``old_name`` (with a warning) when only that is set.
        EE_HEALTH_TIMEOUT_SEC was renamed because eecp's variable of that name means
        something else (the health silence after which an app fails): one environment
        file may set both programs' variables."""
        if not self.raw(old_name):
            return self.get(name, default, parse)
        if self.raw(name):
            self.warnings.append(f"{old_name} is ignored: {name} is set (for the agent, "
                                 f"{old_name} is the old name of {name})")
            return self.get(name, default, parse)
        self.warnings.append(f"{old_name} is the old name of {name}: it is read for now; "
                             f"rename it")
        return self.get(old_name, default, parse)


def _missing(name: str) -> NoReturn:
    raise ConfigError(name, "is required")


def _checked_register(**fields: str) -> Register:
    """The register message as eecp will read it, or a ConfigError naming the bad variable."""
    try:
        message = decode_agent_message(encode_register(Register(
            fields["repo"], fields["release_tag"], fields["app_name"], fields["network"],
            fields["agent_id"], node_id=fields["node_id"] or None)))
    except ProtocolError as exc:
        key = exc.reason.partition(":")[2]
        raise ConfigError(_REGISTER_VARIABLES.get(key, "EE_REPO"), exc.detail) from None
    assert isinstance(message, Register)
    return message


def _agent_id(r: _Reader) -> str:
    """``EE_AGENT_ID``; else the id kept in ``EE_AGENT_ID_FILE``; else a fresh one per process."""
    explicit = r.raw("EE_AGENT_ID")
    if explicit:
        return explicit  # checked with the other register fields
    id_file = r.raw("EE_AGENT_ID_FILE")
    if not id_file:
        return str(uuid.uuid4())
    try:
        return _persisted_agent_id(Path(id_file))
    except (ValueError, OSError) as exc:
        raise ConfigError("EE_AGENT_ID_FILE", str(exc)) from None


def _persisted_agent_id(path: Path) -> str:
    if path.exists():
        text = path.read_text(encoding="utf-8").strip()
        try:
            return str(uuid.UUID(text))
        except ValueError:
            raise ValueError(f"{path} does not hold a UUID") from None
    agent_id = str(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    # temp file + rename: a crash mid-write must not leave a half id that later fails to parse
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(agent_id + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return agent_id


def _ws_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{raw!r} is not a ws:// or wss:// URL")
    parts.port  # noqa: B018 - raises ValueError for a port out of range
    return raw


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an http:// or https:// URL")
    parts.port  # noqa: B018 - raises ValueError for a port out of range
    return raw


def _url_path(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError(f"{raw!r} must start with /")
    return raw


def _positive(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError(f"{raw!r} must be a positive number")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"{raw!r} must be an integer >= 1")
    return value


def _non_negative(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError(f"{raw!r} must be a number >= 0")
    return value


def _provider_name(raw: str) -> QuoteProviderName:
    if raw == "configfs-tsm":
        return "configfs-tsm"
    if raw == "dev":
        return "dev"
    raise ValueError(f"{raw!r} is not one of configfs-tsm, dev")


def _hex_bytes(raw: str, size: int) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]*", raw) or len(raw) != 2 * size:
        raise ValueError(f"expected {2 * size} hex characters")
    return bytes.fromhex(raw)


def _sha384_hex(raw: str) -> bytes:
    return _hex_bytes(raw, 48)


def _rtmrs(raw: str) -> tuple[bytes, bytes, bytes, bytes]:
    values = [_sha384_hex(part.strip()) for part in raw.split(",")]
    if len(values) != 4:
        raise ValueError("expected four comma-separated RTMRs (96 hex characters each)")
    return values[0], values[1], values[2], values[3]


def _fmspc(raw: str) -> str:
    return _hex_bytes(raw, 6).hex().upper()


def _sealed(raw: str) -> bool:
    value = raw.lower()
    if value in _SEAL_TRUE:
        return True
    if value in _SEAL_FALSE:
        return False
    raise ValueError(f"{raw!r} is not one of 1, true, yes, 0, false, no")


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError(f"{raw!r} is not one of text, json")
    return raw


def _log_level(raw: str) -> str:
    if raw.upper() not in _LOG_LEVELS:
        raise ValueError(f"{raw!r} is not a log level")
    return raw.upper()

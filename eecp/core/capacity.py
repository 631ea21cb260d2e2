"""File descriptors and connection caps: one listener's flood must not starve the others.

Every accepted connection holds a file descriptor, and a process has ``RLIMIT_NOFILE`` of them
(1024 by default on most distributions). When they run out, ``accept`` fails with ``EMFILE``
on every listener at once, and so does everything else that opens one (the store, the PCCS
and GitHub client): 1,100 idle sockets to the proxy listener made ``/health``, resolve and the
proxy time out together. Decisions:

* **The limit.** :func:`raise_file_limit` raises the soft limit to the hard one at start (what
  an unprivileged process may do; the hard one is the operator's, ``LimitNOFILE=`` in systemd)
  and ``serve()`` logs the figure once.
* **One cap per listener.** The control port (API, health, and every agent's tunnel), the
  proxy listener and the auth listener each have their own cap (``EE_CONTROL_MAX_CONNECTIONS``,
  ``EE_PROXY_MAX_CONNECTIONS``, ``EE_AUTH_MAX_CONNECTIONS``), and together they stay below the
  limit less :data:`RESERVED_FDS` kept for everything else: however one listener is flooded,
  the others and the store still get descriptors. :func:`listener_caps` derives the caps not
  set from what the set ones leave, in the proportions of :data:`SHARES`; caps that do not
  fit the limit are a ``ConfigError`` naming the variable.
* **At the cap** (:class:`ConnectionGate`), a new connection makes room by closing the
  listener's oldest *idle* connection — accepted and silent, or kept alive between requests —
  never one in the middle of a request (nor an established tunnel). With none idle, the new
  connection is accepted and closed at once, so the kernel's backlog does not fill with
  connections nobody will serve. Either is logged, at most once every
  :data:`REPORT_EVERY_SEC`, with counts. A flood of idle sockets thus costs the flooder its
  own oldest sockets, and a fresh request is still served.
* **accept errors.** ``trio.serve_listeners`` (which both servers use) logs every ``EMFILE``,
  ``ENFILE``, ``ENOBUFS`` or ``ENOMEM`` of ``accept`` with a traceback and retries every 0.1 s:
  ten tracebacks a second while it lasts. :func:`quiet_accept_errors` turns them into one
  warning line at most every :data:`REPORT_EVERY_SEC`, with a count and no traceback (trio's
  retry itself is kept).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from eecp.core.errors import ConfigError
from eecp.core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from eecp.core.config import Config

log = logging.getLogger("eecp.capacity")

#: descriptors kept out of every listener's cap: the store (SQLite's files, or one PostgreSQL
#: connection per store worker), the PCCS/GitHub client (httpx: at most 100 connections),
#: standard streams, trio's own, logs, worker threads' files
RESERVED_FDS = 256
#: how the descriptors left are shared by listeners without an explicit cap: the control port
#: carries a connection per agent (its tunnel) besides the API, the proxy listener one per
#: client connection (front proxies keep theirs alive), the auth listener a front proxy's few
SHARES = {"control": 4, "proxy": 3, "auth": 1}
#: a listener without a set cap gets at least this many, or the set caps are a ConfigError
MIN_CAP = 16
#: the least time between two log lines about a cap reached, or about accept failing
REPORT_EVERY_SEC = 60.0
#: below this file limit, start-up warns (a few hundred agents already need more)
LOW_FILE_LIMIT = 4096
#: used when the hard limit is unlimited and /proc/sys/fs/nr_open cannot be read
_NR_OPEN_FALLBACK = 1 << 20
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_VARIABLES = {"control": "EE_CONTROL_MAX_CONNECTIONS", "proxy": "EE_PROXY_MAX_CONNECTIONS",
              "auth": "EE_AUTH_MAX_CONNECTIONS"}


@dataclass(frozen=True)
class FileLimit:
    """``RLIMIT_NOFILE`` before and after :func:`raise_file_limit`."""

    was: int
    soft: int
    hard: int


def raise_file_limit() -> FileLimit:
    """Raise the soft file limit to the hard one (as far as the kernel allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file limit from %d to %d: %s", soft, target, exc)
        else:
            return FileLimit(soft, target, hard)
    usable = soft if soft != resource.RLIM_INFINITY else target
    return FileLimit(usable, usable, hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return _NR_OPEN_FALLBACK


@dataclass(frozen=True)
class ListenerCaps:
    """The most connections each listener holds at once."""

    control: int
    proxy: int
    auth: int


def listener_caps(config: Config, file_limit: int) -> ListenerCaps:
    """Each listener's cap: the configured one, else its share of what the file limit leaves
    once :data:`RESERVED_FDS` and the configured caps are taken out. Raises ``ConfigError``
    when the configured caps do not fit."""
    reserved = min(RESERVED_FDS, file_limit // 4)  # a tiny limit still serves a few
    room = file_limit - reserved
    configured = {"control": config.control_max_connections,
                  "proxy": config.proxy_max_connections, "auth": config.auth_max_connections}
    fixed = {name: cap for name, cap in configured.items() if cap is not None}
    derived = [name for name in SHARES if name not in fixed]
    left = room - sum(fixed.values())
    if fixed and left < MIN_CAP * len(derived):
        names = ", ".join(_VARIABLES[name] for name in fixed)
        raise ConfigError(_VARIABLES[next(iter(fixed))], (
            f"{names} add up to {sum(fixed.values())} connections, but the file limit of "
            f"{file_limit} leaves {room} for all listeners ({reserved} are kept for the store "
            f"and outbound connections){' with room for the others' if derived else ''}: "
            "raise the limit (LimitNOFILE=) or lower the caps"))
    weight = sum(SHARES[name] for name in derived)
    caps = {**fixed, **{name: max(1, left * SHARES[name] // weight) for name in derived}}
    return ListenerCaps(**caps)


def log_capacity(limit: FileLimit, caps: ListenerCaps) -> None:
    """The start-up line about descriptors (and a warning when they are few)."""
    raised = f" (raised from {limit.was})" if limit.soft != limit.was else ""
    log.info("file limit %d%s; connection caps: control %d, proxy %d, auth %d", limit.soft,
             raised, caps.control, caps.proxy, caps.auth)
    if limit.soft < LOW_FILE_LIMIT:
        log.warning("the file limit is only %d (hard limit %d): every connection, tunnels "
                    "included, holds a descriptor; raise it (LimitNOFILE=65536 in systemd)",
                    limit.soft, limit.hard)


class Evictable(Protocol):
    """A connection the gate may close to make room (it is told so only while idle)."""

    def evict(self) -> None: ...


#: a request head under way this long is no longer spared when a listener needs room
HEAD_GRACE_SEC = 1.0


class ConnectionGate:
    """The connections of one listener: admits up to ``cap``, then makes room by evicting the
    oldest idle one — else the one whose request head has been under way the longest, once
    that is :data:`HEAD_GRACE_SEC` — or refuses.

    The server tells it when a connection becomes idle (:meth:`idle`: waiting for a request),
    starts receiving a head (:meth:`heading`) and is busy (:meth:`busy`: serving a request,
    a tunnel, or gone). Heads are evictable after a grace because a byte is all it takes to
    start one: were heads spared, a flood of one-byte connections would fill the cap for as
    long as the head timeout, and every newcomer (an agent re-dialling, a health check) would
    be refused meanwhile; a real client's head arrives well within the grace. An evicted
    connection still counts until its task has closed it (:meth:`leave`), so for an instant
    the count may pass the cap by the connections being closed to make room.
    """

    def __init__(self, name: str, cap: int) -> None:
        if cap < 1:
            raise ValueError("a connection cap is at least 1")
        self.name = name
        self.cap = cap
        self.live = 0
        self.evicted = 0  # totals, for tests and the log line
        self.refused = 0
        self._idle: dict[Evictable, None] = {}  # oldest first
        self._heading: dict[Evictable, float] = {}  # when its head began, oldest first
        self._report: TokenBucket | None = None
        self._reported = (0, 0)  # evicted, refused at the last report

    def admit(self) -> bool:
        """Whether a connection just accepted may be served (it then counts until
        :meth:`leave`); at the cap, closes the oldest idle connection to make room."""
        if self.live >= self.cap:
            victim = self._victim()
            if victim is None:
                self.refused += 1
                self._note()
                return False
            self.busy(victim)
            victim.evict()
            self.evicted += 1
            self._note()
        self.live += 1
        return True

    def leave(self) -> None:
        """An admitted connection has ended (its key must be :meth:`busy` by then)."""
        self.live -= 1

    def _victim(self) -> Evictable | None:
        if self._idle:
            return next(iter(self._idle))
        for connection, since in self._heading.items():  # the oldest head only: the rest
            return connection if trio.current_time() - since >= HEAD_GRACE_SEC else None
        return None

    def idle(self, connection: Evictable) -> None:
        """``connection`` waits for a request: the newest candidate for eviction."""
        self._heading.pop(connection, None)
        self._idle.pop(connection, None)
        self._idle[connection] = None

    def heading(self, connection: Evictable) -> None:
        """``connection`` is receiving a request head (from now, unless it already was):
        evictable once it has taken :data:`HEAD_GRACE_SEC`."""
        self._idle.pop(connection, None)
        self._heading.setdefault(connection, trio.current_time())

    def busy(self, connection: Evictable) -> None:
        """``connection`` is serving a request or a tunnel (or is gone): never evicted."""
        self._idle.pop(connection, None)
        self._heading.pop(connection, None)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def _note(self) -> None:
        now = trio.current_time()
        if self._report is None:
            self._report = TokenBucket.full(1.0 / REPORT_EVERY_SEC, 1.0, now)
        if self._report.take(now):
            evicted, refused = self._reported
            log.warning("%s is at its cap of %d connections; since the last report: %d idle "
                        "closed to make room, %d new refused", self.name, self.cap,
                        self.evicted - evicted, self.refused - refused)
            self._reported = (self.evicted, self.refused)


class _AcceptErrors(logging.Filter):
    """On ``trio.serve_listeners``' logger: its accept-capacity errors become one warning line
    at most every :data:`REPORT_EVERY_SEC` (with a count), without a traceback; anything else
    it logs passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._bucket: TokenBucket | None = None
        self._failures = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, OSError) or error.errno not in _ACCEPT_CAPACITY_ERRNOS:
            return True
        self._failures += 1
        if self._bucket is None:
            self._bucket = TokenBucket.full(1.0 / REPORT_EVERY_SEC, 1.0, record.created)
        if not self._bucket.take(record.created):
            return False
        code = errno.errorcode.get(error.errno, str(error.errno))
        record.msg = ("accept failed with %s (%s): out of file descriptors or kernel memory; "
                      "retrying every 0.1 s (%d failures since the last report; check the file "
                      "limit and the EE_*_MAX_CONNECTIONS caps)")
        record.args = (code, os.strerror(error.errno), self._failures)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self._failures = 0
        return True


def quiet_accept_errors() -> None:
    """Install the accept-error filter on ``trio.serve_listeners``' logger (once)."""
    logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _AcceptErrors) for f in logger.filters):
        logger.addFilter(_AcceptErrors())

"""systemd's notify protocol (``Type=notify``), without a dependency on libsystemd.

The protocol is one datagram per notification to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name written with a leading ``@``): newline
separated ``KEY=value`` lines. eecp sends ``READY=1`` (with ``STATUS=``) once every listener is
bound, ``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec`` (as ``sd_watchdog_enabled`` does, a
``$WATCHDOG_PID`` naming another process turns it off). The variables are read with the rest of
the configuration (:class:`~eecp.core.config.Config`'s ``notify_socket``, ``watchdog_usec``,
``watchdog_pid``), so a test hands them in as it hands in ``EE_*``.

Sending never blocks the trio loop and never fails eecp: the socket is non-blocking (a datagram
to a full queue is dropped) and an error is logged, once: a service manager that went away is no
reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("eecp.sdnotify")


def message(fields: Mapping[str, str]) -> bytes:
    """The datagram for ``fields`` (``{"READY": "1", "STATUS": "..."}``), in their order. A
    value is one line: a newline in it would start a field of its own."""
    lines = []
    for key, value in fields.items():
        if not key or not key.isupper() or "=" in key or not key.replace("_", "").isalnum():
            raise ValueError(f"not a notify field name: {key!r}")
        lines.append(f"{key}={' '.join(value.splitlines())}")
    return ("\n".join(lines) + "\n").encode()


def parse_address(raw: str) -> str:
    """``$NOTIFY_SOCKET`` as a socket address: an absolute path, or ``@name`` for the abstract
    namespace (the kernel's leading NUL byte). ``ValueError`` for anything else (``vsock:``,
    which only a VM's service manager uses)."""
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    raise ValueError("must be an absolute path or an abstract socket name starting with '@'")


def watchdog_interval(usec: int, pid: int | None, own_pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout, as sd_watchdog_enabled
    advises), or None when the watchdog is off or meant for another process."""
    if usec <= 0 or (pid is not None and pid != own_pid):
        return None
    return usec / 2_000_000


class Notifier:
    """Sends notifications to one notify socket."""

    def __init__(self, address: str, watchdog_sec: float | None = None) -> None:
        self.address = address
        self.watchdog_sec = watchdog_sec
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._warned = False

    @classmethod
    def create(cls, notify_socket: str | None, watchdog_usec: int = 0,
               watchdog_pid: int | None = None) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET`` (already checked by :func:`parse_address`), or None
        when eecp does not run under a service manager that listens."""
        if not notify_socket:
            return None
        return cls(notify_socket, watchdog_interval(watchdog_usec, watchdog_pid, os.getpid()))

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one notification; False (logged once) when it could not be delivered."""
        try:
            self._sock.sendto(message(fields), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at NOTIFY_SOCKET=%s: %s "
                            "(further failures are not logged)",
                            self.address.replace("\0", "@", 1), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send({"READY": "1", "STATUS": status})

    def stopping(self, status: str = "shutting down") -> bool:
        return self.send({"STOPPING": "1", "STATUS": status})

    async def serve_watchdog(self) -> None:
        """``WATCHDOG=1`` at once, then every :attr:`watchdog_sec`, until cancelled: a loop
        this task shares with the rest of eecp, so a stalled loop stops the pings and
        systemd restarts the service."""
        if self.watchdog_sec is None:
            return
        while True:
            self.send({"WATCHDOG": "1"})
            await trio.sleep(self.watchdog_sec)

    def close(self) -> None:
        self._sock.close()

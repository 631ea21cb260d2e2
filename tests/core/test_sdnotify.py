"""systemd's notify protocol: the datagrams, the addresses, the watchdog's interval, and the
variables read with the configuration."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from eecp.core import sdnotify
from eecp.core.config import from_env
from eecp.core.errors import ConfigError
from eecp.core.sdnotify import Notifier


def test_message_is_newline_separated_fields_in_order() -> None:
    assert sdnotify.message({"READY": "1", "STATUS": "serving"}) == b"READY=1\nSTATUS=serving\n"
    # a newline in a value would start a field of its own (a STATUS naming "READY=1")
    assert sdnotify.message({"STATUS": "a\nREADY=1"}) == b"STATUS=a READY=1\n"
    for bad in ("", "ready", "A=B", "A B"):
        with pytest.raises(ValueError):
            sdnotify.message({bad: "1"})


def test_addresses_paths_and_abstract_names() -> None:
    assert sdnotify.parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.parse_address("@eecp/notify") == "\0eecp/notify"
    for bad in ("relative/path", "@", "vsock:2:1234"):
        with pytest.raises(ValueError):
            sdnotify.parse_address(bad)


def test_watchdog_interval_is_half_the_timeout_for_this_process_only() -> None:
    assert sdnotify.watchdog_interval(30_000_000, None, 7) == 15.0
    assert sdnotify.watchdog_interval(30_000_000, 7, 7) == 15.0
    assert sdnotify.watchdog_interval(30_000_000, 8, 7) is None
    assert sdnotify.watchdog_interval(0, None, 7) is None


def test_config_reads_systemds_variables() -> None:
    config = from_env({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "42"})
    assert (config.notify_socket, config.watchdog_usec, config.watchdog_pid) == (
        "\0sd", 5_000_000, 42)
    assert from_env({}).notify_socket is None
    for name, value in (("NOTIFY_SOCKET", "notify"), ("WATCHDOG_USEC", "-1"),
                        ("WATCHDOG_USEC", "soon"), ("WATCHDOG_PID", "0")):
        with pytest.raises(ConfigError) as caught:
            from_env({name: value})
        assert caught.value.variable == name


def test_a_notify_socket_that_is_gone_is_reported_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert notifier.ready("x") is False
        assert notifier.stopping() is False
    finally:
        notifier.close()
    warnings = [r for r in caplog.records if "cannot notify" in r.getMessage()]
    assert len(warnings) == 1  # once, not at every watchdog ping


def test_a_full_queue_drops_the_datagram_instead_of_blocking(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        notifier = Notifier(str(tmp_path / "notify"))
        try:
            sent = [notifier.send({"WATCHDOG": "1"}) for _ in range(10_000)]
        finally:
            notifier.close()
    assert sent[0] is True and sent[-1] is False

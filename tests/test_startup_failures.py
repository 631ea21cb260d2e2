"""Start-up failures of ``eecp serve`` and ``eecp demo``, through the console script: a port in
use, an address the host does not have, a store directory that cannot be written, a PostgreSQL
that does not answer. Each is one line naming what and where, exit status 1 — and a group that
holds a bug as well keeps its traceback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eecp.cli import report_startup_failure, startup_failures
from eecp.core.errors import ConfigError, StartupError, StoreError

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0  # real seconds: a subprocess's start (imports, the store's migration)


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": "0",
            "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": "0", "EE_AUTH_BIND": "127.0.0.1",
            "EE_AUTH_PORT": "0", "EE_DB_PATH": str(tmp_path / "db" / "eecp.db"),
            "EE_PCCS_URL": "http://127.0.0.1:9",
            "EE_LOG_LEVEL": "ERROR",  # what is left on stderr is the failure alone
            **extra}


def eecp(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the ``eecp`` console script the package installs (what an operator types), or
    ``python -m eecp`` where there is none."""
    script = Path(sys.executable).with_name("eecp")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "eecp"]
    return subprocess.run([*command, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Trio nursery" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


@pytest.mark.parametrize(("variable", "listener"), [
    ("EE_CONTROL_PORT", "control port"),
    ("EE_PROXY_PORT", "proxy listener"),
    ("EE_AUTH_PORT", "auth listener"),
])
def test_serve_names_the_port_in_use(tmp_path: Path, taken_port: int, variable: str,
                                     listener: str) -> None:
    done = eecp("serve", env=serve_env(tmp_path, **{variable: str(taken_port)}))
    assert one_line(done) == (f"eecp: cannot listen on 127.0.0.1:{taken_port} "
                              f"({listener}, {variable}): address already in use")


def test_serve_names_the_bind_the_host_does_not_have(tmp_path: Path) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this host
    done = eecp("serve", env=serve_env(tmp_path, EE_CONTROL_BIND="192.0.2.1",
                                       EE_CONTROL_PORT="8088"))
    assert one_line(done) == ("eecp: cannot listen on 192.0.2.1:8088 (control port, "
                              "EE_CONTROL_BIND): cannot assign requested address")


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory eecp cannot create files in: read-only by its mode, or (root ignores
    modes) one on sysfs, where nobody creates anything."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if not os.access(readonly, os.W_OK):
        return readonly
    try:
        (Path("/sys") / "eecp-probe").mkdir()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return Path("/sys")
    pytest.skip("running as root with no read-only filesystem to point EE_DB_PATH into")


def test_serve_names_a_store_directory_it_cannot_write(tmp_path: Path) -> None:
    path = unwritable_dir(tmp_path) / "eecp" / "eecp.db"
    line = one_line(eecp("serve", env=serve_env(tmp_path, EE_DB_PATH=str(path))))
    assert line.startswith(f"eecp: cannot open the store sqlite:{path} (EE_DB_PATH): ")


def test_serve_names_a_store_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "eecp.db"
    line = one_line(eecp("serve", env=serve_env(tmp_path, EE_DB_PATH=str(path))))
    assert line == (f"eecp: cannot open the store sqlite:{path} (EE_DB_PATH): "
                    f"cannot create {tmp_path / 'a-file'}: File exists")


def test_serve_names_a_postgresql_that_does_not_answer(tmp_path: Path) -> None:
    port = closed_port()
    line = one_line(eecp("serve", env=serve_env(
        tmp_path, EE_DB_URL=f"postgresql://eecp@127.0.0.1:{port}/eecp")))
    assert line.startswith(f"eecp: cannot open the store postgresql://eecp@127.0.0.1:{port}"
                           "/eecp (EE_DB_URL): ")
    assert "connection refused" in line.lower()


def test_the_demo_names_its_option_for_the_port_in_use(tmp_path: Path, taken_port: int
                                                       ) -> None:
    done = eecp("demo", "--dir", str(tmp_path / "demo"), "--control-port", str(taken_port),
                "--proxy-port", "0", "--auth-port", "0", env=serve_env(tmp_path))
    assert one_line(done) == (f"eecp demo: cannot listen on 127.0.0.1:{taken_port} "
                              "(control port, --control-port): address already in use")


def test_the_demo_names_a_dir_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    directory = tmp_path / "a-file" / "demo"
    done = eecp("demo", "--dir", str(directory), "--control-port", "0", "--proxy-port", "0",
                "--auth-port", "0", env=serve_env(tmp_path))
    assert one_line(done) == f"eecp demo: cannot write {directory} (--dir): Not a directory"


# ---- which failures become the one line --------------------------------------------------

LISTEN = StartupError("listen_failed", "cannot listen on 127.0.0.1:1 (control port, X): no")


def test_nested_groups_of_start_up_failures_are_one_line(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    store = StoreError("store_unavailable", "cannot open the store sqlite:x (EE_DB_PATH): no")
    nested = ExceptionGroup("root", [ExceptionGroup("inner", [LISTEN]), store])
    assert startup_failures(nested) == [LISTEN, store]
    assert report_startup_failure(nested, "eecp") == 1
    assert capsys.readouterr().err == f"eecp: {LISTEN.detail}\n"


def test_a_configuration_error_among_them_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    group = ExceptionGroup("root", [LISTEN, ConfigError("EE_X", "bad")])
    assert report_startup_failure(group, "eecp") == 2
    assert capsys.readouterr().err == "eecp: configuration error: EE_X: bad\n"


def test_a_bug_beside_a_start_up_failure_keeps_its_traceback() -> None:
    bug = ValueError("a bug")
    group = ExceptionGroup("root", [ExceptionGroup("inner", [LISTEN, bug])])
    assert startup_failures(group) is None
    with pytest.raises(ExceptionGroup) as raised:
        report_startup_failure(group, "eecp")
    assert raised.value is group
    with pytest.raises(ValueError):
        report_startup_failure(bug, "eecp")

"""A throwaway PostgreSQL server for the store suite: a fresh cluster in a temporary directory,
on a free loopback port, with trust authentication, stopped (and its files removed) at the end.

Found through ``initdb`` on PATH or Debian's ``/usr/lib/postgresql/<version>/bin``. PostgreSQL
refuses to run as root, so under root the cluster belongs to the ``postgres`` user (which the
Debian package creates) and its commands run through ``runuser``. :func:`unavailable` says why
no server can be started, for a skip message.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "eecp"  # the cluster's superuser: the URL's user


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return versions[-1].parent if versions else None


def _run_as() -> list[str] | None:
    """The command prefix to run the server's commands with: none needed, runuser to the
    postgres user under root, or None when root has nobody to run them as."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--"] if runuser else None


def unavailable() -> str | None:
    """Why no throwaway server can be started here; None when one can."""
    if _bin_dir() is None:
        return "no initdb (install postgresql, or set EECP_TEST_PG_URL)"
    if _run_as() is None:
        return "running as root without a postgres user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server() -> Iterator[str]:
    """Start a server; yields its URL (``postgresql://eecp@127.0.0.1:<port>/postgres``)."""
    bin_dir, prefix = _bin_dir(), _run_as()
    if bin_dir is None or prefix is None:
        raise RuntimeError(unavailable())
    with tempfile.TemporaryDirectory(prefix="eecp-pg-") as tmp:
        data = Path(tmp) / "data"
        if prefix:  # the postgres user must own the cluster (and reach it through tmp)
            os.chmod(tmp, 0o755)
            data.mkdir()
            entry = pwd.getpwnam("postgres")
            os.chown(data, entry.pw_uid, entry.pw_gid)
        port = _free_port()

        def run(*args: str) -> None:
            subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "--no-sync",
            "-E", "UTF8")
        # fsync off: the data is thrown away; the socket directory is the cluster's own
        options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
            str(data / "server.log"), "-w", "-t", "60", "start")
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")

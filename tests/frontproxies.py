"""Real nginx and Caddy in front of a test eecp, configured from the shipped examples.

``examples/nginx.conf`` and the top-level ``Caddyfile`` are adapted by plain text substitution
(loopback test ports instead of 443/8088/8089/9090, no TLS, a temporary cache directory, Caddy's
admin endpoint off) so the files under test stay the files we ship. Every substitution must
match: an example that drifts away from what the adapters expect fails loudly instead of being
tested half-adapted.

Both servers run as child processes in their own process group on 127.0.0.1, with every file
(pid, logs, temp paths, Caddy's data) under the test's temporary directory; readiness is a
successful TCP connect, bounded in real time; they are always stopped when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_EXAMPLE = REPO_ROOT / "examples" / "nginx.conf"
CADDYFILE = REPO_ROOT / "Caddyfile"
#: where eecp listens in the examples (its defaults)
EXAMPLE_CONTROL, EXAMPLE_AUTH, EXAMPLE_PROXY = "127.0.0.1:8088", "127.0.0.1:8089", "127.0.0.1:9090"
APP_DOMAIN = "app.example.com"
CONTROL_HOST = "control.example.com"
READY_SEC = 15.0
STOP_SEC = 5.0


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def caddy_binary() -> str | None:
    return shutil.which("caddy") or next(
        (p for p in ("/usr/bin/caddy", "/usr/local/bin/caddy") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EecpPorts:
    """Where the eecp under test listens on 127.0.0.1."""

    control: int
    auth: int
    proxy: int


def _sub(pattern: str, replacement: str, text: str, *, flags: int = re.MULTILINE,
         expect: int | None = None) -> str:
    """``re.subn`` that insists on matching (``expect`` times, when given)."""
    out, count = re.subn(pattern, replacement, text, flags=flags)
    if count == 0 or (expect is not None and count != expect):
        raise AssertionError(f"example drifted: {pattern!r} matched {count} times"
                             + (f", expected {expect}" if expect is not None else ""))
    return out


def _eecp_addresses(text: str, ports: EecpPorts) -> str:
    text = _sub(re.escape(EXAMPLE_CONTROL), f"127.0.0.1:{ports.control}", text)
    text = _sub(re.escape(EXAMPLE_AUTH), f"127.0.0.1:{ports.auth}", text)
    return _sub(re.escape(EXAMPLE_PROXY), f"127.0.0.1:{ports.proxy}", text)


def adapt_nginx(text: str, *, listen: int, ports: EecpPorts, cache_dir: Path) -> str:
    """``examples/nginx.conf`` listening on plain HTTP at 127.0.0.1:``listen``."""
    text = _sub(r"^(\s*)listen 443 ssl[^;]*;", rf"\g<1>listen 127.0.0.1:{listen};", text,
                expect=2)
    text = _sub(r"^\s*listen \[::\]:443[^;]*;\n", "", text, expect=2)
    text = _sub(r"^\s*ssl_[a-z_]+\s[^;]*;\n", "", text)
    text = _sub(r"proxy_cache_path /var/cache/nginx/eecp_auth ", f"proxy_cache_path {cache_dir} ",
                text, expect=1)
    return _eecp_addresses(text, ports)


def adapt_caddyfile(text: str, *, listen: int, ports: EecpPorts) -> str:
    """The ``Caddyfile`` serving both sites on plain HTTP at 127.0.0.1:``listen``, admin off."""
    text = _sub(r"^\{\n", "{\n\tadmin off\n\tauto_https off\n", text,
                expect=1)
    text = _sub(rf"^{re.escape(CONTROL_HOST)} \{{",
                f"http://{CONTROL_HOST}:{listen} {{", text, expect=1)
    text = _sub(rf"^\*\.{re.escape(APP_DOMAIN)} \{{",
                f"http://*.{APP_DOMAIN}:{listen} {{", text, expect=1)
    text = _sub(r"^\s*tls internal\n", "", text, expect=1)
    text = _eecp_addresses(text, ports)
    # bind only loopback
    return _sub(r"^(\s*)admin off\n", "\\g<1>admin off\n\\g<1>default_bind 127.0.0.1\n", text,
                expect=1)


@dataclass
class FrontProxy:
    """A running nginx or Caddy: the client talks to ``http://127.0.0.1:<port>`` and picks the
    site with the Host header."""

    kind: str
    port: int
    workdir: Path
    log_path: Path
    process: trio.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-8000:]}")
        return "\n".join(parts)


async def _wait_listening(proxy: FrontProxy) -> None:
    """Poll 127.0.0.1:port until it accepts (real time, bounded); fail with the log if the
    process exits or never listens."""
    end = time.monotonic() + READY_SEC
    while True:
        if proxy.process.poll() is not None:
            raise AssertionError(f"{proxy.kind} exited with {proxy.process.returncode} before "
                                 f"listening:\n{proxy.log()}")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        except OSError:
            if time.monotonic() > end:
                raise AssertionError(f"{proxy.kind} not listening on {proxy.port} within "
                                     f"{READY_SEC}s:\n{proxy.log()}") from None
            await trio.sleep(0.02)
        else:
            await stream.aclose()
            return


async def _stop(process: trio.Process) -> None:
    """SIGTERM the process group we started, wait (bounded), then SIGKILL it."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            with trio.move_on_after(STOP_SEC):
                await process.wait()
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            await process.wait()
        else:  # the leader is gone; make sure no worker of ours outlives it
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: trio.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)  # our own group: start_new_session=True below


@dataclass(frozen=True)
class _Plan:
    """How to start one front proxy (prepared off the event loop: files, ``nginx -t``)."""

    kind: str
    argv: list[str]
    port: int
    workdir: Path
    env: dict[str, str] | None = None


@asynccontextmanager
async def _running(plan: _Plan) -> AsyncIterator[FrontProxy]:
    log_path = plan.workdir / f"{plan.kind}-stdout.log"
    out = await trio.to_thread.run_sync(os.open, str(log_path),
                                        os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        process = await trio.lowlevel.open_process(
            plan.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=plan.env)
    finally:
        os.close(out)
    proxy = FrontProxy(plan.kind, plan.port, plan.workdir, log_path, process)
    try:
        await _wait_listening(proxy)
        yield proxy
    finally:
        await _stop(process)


def nginx_wrapper(workdir: Path, site: Path) -> str:
    """A whole nginx.conf around the conf.d-style ``site``, everything under ``workdir``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach workdir (0700)
    return (
        f"{user}worker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        # auth subrequests are logged too, with their micro-cache status (HIT/MISS/EXPIRED)
        "    log_format eecp_test '$uri $status \"$upstream_cache_status\"';\n"
        f"    access_log {workdir}/access.log eecp_test;\n"
        "    log_subrequest on;\n"
        f"    client_body_temp_path {workdir}/client_body;\n"
        f"    proxy_temp_path {workdir}/proxy_temp;\n"
        f"    fastcgi_temp_path {workdir}/fastcgi_temp;\n"
        f"    uwsgi_temp_path {workdir}/uwsgi_temp;\n"
        f"    scgi_temp_path {workdir}/scgi_temp;\n"
        f"    include {site};\n"
        "}\n"
    )


def plan_nginx(workdir: Path, ports: EecpPorts, example: Path = NGINX_EXAMPLE) -> _Plan:
    """Write the adapted example and its wrapper under ``workdir``; ``nginx -t`` them."""
    binary = nginx_binary()
    assert binary is not None, "nginx is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = workdir / "eecp.conf"
    site.write_text(adapt_nginx(example.read_text(), listen=port, ports=ports,
                                cache_dir=workdir / "auth_cache"))
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_wrapper(workdir, site))
    argv = [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    test = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise AssertionError(f"nginx -t refused the adapted example:\n{test.stderr}")
    return _Plan("nginx", [*argv, "-g", "daemon off;"], port, workdir)


def plan_caddy(workdir: Path, ports: EecpPorts, caddyfile: Path = CADDYFILE) -> _Plan:
    """Write the adapted Caddyfile under ``workdir``; Caddy's data and config live there too."""
    binary = caddy_binary()
    assert binary is not None, "caddy is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "Caddyfile"
    config.write_text(adapt_caddyfile(caddyfile.read_text(), listen=port, ports=ports))
    env = {**os.environ, "HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"),
           "XDG_CONFIG_HOME": str(workdir / "config")}
    argv = [binary, "run", "--config", str(config), "--adapter", "caddyfile"]
    return _Plan("caddy", argv, port, workdir, env)


@asynccontextmanager
async def open_front_proxy(kind: str, workdir: Path, ports: EecpPorts
                           ) -> AsyncIterator[FrontProxy]:
    """Run ``kind`` (``nginx`` or ``caddy``) configured from its shipped example until the
    block ends."""
    planner = {"nginx": plan_nginx, "caddy": plan_caddy}[kind]
    plan = await trio.to_thread.run_sync(planner, workdir, ports)
    async with _running(plan) as proxy:
        yield proxy

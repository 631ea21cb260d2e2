"""``serve()`` and ``eecp serve``: the root nursery, /health, graceful stop, config errors, the
file limit and the listeners' connection caps."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from eecp.core.config import from_env
from eecp.dev import pki as devpki
from eecp.service import Bound, serve


def config_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": "0",
            "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": "0", "EE_AUTH_PORT": "0",
            "EE_DB_PATH": str(tmp_path / "db" / "eecp.db"), "EE_PCCS_URL": "http://127.0.0.1:9",
            **extra}


async def test_serve_reports_its_port_and_answers_health(tmp_path: Path) -> None:
    root = devpki.make_pki(seed=1).write_root(tmp_path / "root.pem")
    config = from_env(config_env(tmp_path, EE_DCAP_ROOT_CA=str(root)))
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound: Bound = await nursery.start(lambda task_status: serve(
            config, shutdown=shutdown, handle_signals=False, task_status=task_status))
        assert bound.control_port != 0
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{bound.control_url}/health")
        body = response.json()
        assert response.status_code == 200
        assert body["status"] == "ok" and body["store"] == "ok"
        assert body["version"] == "0.1.0" and body["store_backend"] == "sqlite"
        assert body["dev_root_ca"] is True and "warning" in body
        assert body["networks"] == {"forge-1": "sealed", "sandbox-1": "open"}
        assert (tmp_path / "db" / "eecp.db").exists()
        shutdown.set()
    # serve() returned: the nursery closed, so nothing it started is left running


async def test_health_without_dev_root(tmp_path: Path) -> None:
    config = from_env(config_env(tmp_path))
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound: Bound = await nursery.start(lambda task_status: serve(
            config, shutdown=shutdown, handle_signals=False, task_status=task_status))
        async with httpx.AsyncClient() as client:
            body = (await client.get(f"{bound.control_url}/health")).json()
        assert body["dev_root_ca"] is False and "warning" not in body
        shutdown.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_health(url: str, proc: subprocess.Popen[str], limit: float = 20.0
                    ) -> dict[str, object]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return dict(httpx.get(url, timeout=1).json())
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("eecp did not come up")


def test_eecp_serve_stops_gracefully_on_sigterm_and_logs_json(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **config_env(tmp_path, EE_CONTROL_PORT=str(port), EE_LOG_FORMAT="json",
                                      EE_ADMIN_TOKEN="tok-very-secret")}
    proc = subprocess.Popen([sys.executable, "-m", "eecp", "serve"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_health(f"http://127.0.0.1:{port}/health", proc)["status"] == "ok"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert time.monotonic() - started < 8
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    messages = [line["msg"] for line in lines]
    assert any("serving control on" in m for m in messages)
    assert any("received SIGTERM" in m for m in messages)
    assert messages[-1] == "stopped"
    assert "tok-very-secret" not in err


def test_eecp_serve_sigint_text_logs(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **config_env(tmp_path, EE_CONTROL_PORT=str(port))}
    proc = subprocess.Popen([sys.executable, "-m", "eecp", "serve"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "INFO eecp.service: stopped" in err
    assert "EE_ADMIN_TOKEN is unset" in err
    assert "EE_PROXY_API_TOKEN is unset" in err


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    for variable, value in [("EE_CONTROL_PORT", "eighty"), ("EE_NETWORKS", "x:maybe"),
                            ("EE_DCAP_ROOT_CA", str(tmp_path / "missing.pem"))]:
        env = {**os.environ, **config_env(tmp_path), variable: value}
        proc = subprocess.run([sys.executable, "-m", "eecp", "serve"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (variable, proc.stderr)
        assert proc.stderr.count("\n") == 1 and variable in proc.stderr
        assert "Traceback" not in proc.stderr


def test_unparseable_root_ca_exits_2(tmp_path: Path) -> None:
    bogus = tmp_path / "root.pem"
    bogus.write_text("not a certificate")
    env = {**os.environ, **config_env(tmp_path), "EE_DCAP_ROOT_CA": str(bogus)}
    proc = subprocess.run([sys.executable, "-m", "eecp", "serve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "EE_DCAP_ROOT_CA" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_help_names_the_configuration_and_its_defaults_as_readme_does() -> None:
    done = subprocess.run([sys.executable, "-m", "eecp", "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "EE_* environment variables" in done.stdout
    assert '"Configuration" section of\nREADME.md' in done.stdout
    shown = dict(re.findall(r"^  (EE_\w+) .*\(default: (.*)\)$", done.stdout, re.MULTILINE))
    assert {"EE_CONTROL_PORT", "EE_PROXY_PORT", "EE_AUTH_PORT", "EE_DB_PATH", "EE_DB_URL",
            "EE_ADMIN_TOKEN", "EE_PCCS_URL"} <= set(shown)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for variable, default in shown.items():  # the same default as README's table says
        documented = "—" if default == "unset" else f"`{default}`"
        assert f"| `{variable}` | {documented} |" in readme, variable


# ---- the file limit and connection caps (eecp.capacity) -------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def file_limit(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child starts with this RLIMIT_NOFILE (hard: unchanged if None)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                            if hard is None else hard))
    return apply


def test_a_flood_of_idle_sockets_on_the_proxy_listener_leaves_every_listener_answering(
        tmp_path: Path) -> None:
    """The issue as reported: with the usual nofile of 1024, 1,100 idle sockets to the proxy
    listener made /health, resolve and the proxy time out, with an EMFILE traceback every
    0.1 s. The demo (eecp, an attested agent, a tiny app) runs under that limit here."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "eecp", "demo", "--dir", str(tmp_path / "demo"),
         "--control-port", "0", "--proxy-port", "0", "--auth-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=file_limit(1024, 1024), env={**os.environ, "EE_LOG_LEVEL": "WARNING"})
    flood: list[socket.socket] = []
    try:
        assert demo.stdout is not None
        printed = ""
        deadline = time.monotonic() + 60
        while not printed.endswith("Ctrl-C stops everything.\n"):
            assert time.monotonic() < deadline, printed
            line = demo.stdout.readline()
            assert line, f"demo exited: {demo.wait()}"
            printed += line
        proxy = re.search(r"curl http://hello\.localhost:(\d+)/ ", printed)
        assert proxy, printed
        control, auth = re.findall(r"curl -i (http://127\.0\.0\.1:\d+)/v1/resolve/hello ", printed)
        for _ in range(1100):
            flood.append(socket.create_connection(("127.0.0.1", int(proxy.group(1)))))
        health = httpx.get(f"{control}/health", timeout=10)
        assert health.status_code == 200 and health.json()["agents_connected"] == 1
        resolved = httpx.get(f"{auth}/v1/resolve/hello", timeout=10)
        assert resolved.status_code == 200 and resolved.json()["allowed"] is True
        answer = httpx.get(f"http://127.0.0.1:{proxy.group(1)}/",
                           headers={"Host": "hello.localhost"}, timeout=10)
        assert answer.status_code == 200 and answer.content.startswith(b"hello from inside")
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=30)
    finally:
        for sock in flood:
            sock.close()
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert "EMFILE" not in err and "Traceback" not in err, err
    assert "proxy listener is at its cap of 288 connections" in err  # one line
    assert err.count("is at its cap") == 1


def test_eecp_serve_raises_its_soft_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard > 512, "the test needs a hard limit over 512"
    port = free_port()
    env = {**os.environ, **config_env(tmp_path, EE_CONTROL_PORT=str(port))}
    proc = subprocess.Popen([sys.executable, "-m", "eecp", "serve"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=file_limit(512))
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft_now = re.search(r"Max open files\s+(\d+)\s+(\d+|unlimited)", limits)
        assert soft_now, limits
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert soft_now.group(1) == soft_now.group(2) or soft_now.group(2) == "unlimited"
    assert int(soft_now.group(1)) > 512
    assert f"file limit {soft_now.group(1)} (raised from 512); connection caps:" in err


def test_caps_the_file_limit_cannot_hold_exit_2_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, **config_env(tmp_path), "EE_CONTROL_MAX_CONNECTIONS": "5000"}
    proc = subprocess.run([sys.executable, "-m", "eecp", "serve"], env=env, capture_output=True,
                          text=True, timeout=30, preexec_fn=file_limit(1024, 1024))
    assert proc.returncode == 2, proc.stderr
    # one line, after the library patches' start-up lines (applied before serve() runs)
    *started, error = proc.stderr.splitlines()
    assert all(" INFO eecp.patches." in line for line in started), proc.stderr
    assert error.startswith("eecp: configuration error: EE_CONTROL_MAX_CONNECTIONS: ")
    assert "file limit of 1024" in error


def test_the_systemd_unit_sets_the_file_limit_binds_to_loopback_and_says_how_to_add_its_user(
        ) -> None:
    unit = (ROOT / "examples" / "eecp.service").read_text()
    settings = [line.strip() for line in unit.splitlines() if not line.startswith("#")]
    limit = [line for line in settings if line.startswith("LimitNOFILE=")]
    assert limit and int(limit[0].split("=", 1)[1]) >= 65536
    for bind in ("EE_CONTROL_BIND=127.0.0.1", "EE_PROXY_BIND=127.0.0.1"):
        assert f"Environment={bind}" in settings
    assert "User=eecp" in settings and "useradd --system" in unit

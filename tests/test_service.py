"""``serve()`` and ``eecp serve``: the root nursery, /health, graceful stop, config errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from eecp.config import from_env
from eecp.service import Bound, serve
from tests import quotefactory as qf


def config_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"EE_CONTROL_BIND": "127.0.0.1", "EE_CONTROL_PORT": "0",
            "EE_PROXY_BIND": "127.0.0.1", "EE_PROXY_PORT": "0", "EE_AUTH_PORT": "0",
            "EE_DB_PATH": str(tmp_path / "db" / "eecp.db"), "EE_PCCS_URL": "http://127.0.0.1:9",
            **extra}


async def test_serve_reports_its_port_and_answers_health(tmp_path: Path) -> None:
    root = qf.make_pki(seed=1).write_root(tmp_path / "root.pem")
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

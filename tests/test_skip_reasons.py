"""The suite's skips say why, async tests' included (``tests/skips.py``): run in a subprocess on
a tiny test directory that uses the suite's hook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_async_tests_skipped_with_a_reason_say_it(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.skips import pytest_runtest_makereport\n")
    (tmp_path / "test_async_skips.py").write_text(
        "import pytest, trio\n\n"
        "async def test_plain():\n"
        "    pytest.skip('nginx is not installed here')\n\n"
        "@pytest.fixture\n"
        "async def missing():\n"
        "    pytest.skip('caddy is not installed here')\n"
        "    yield\n\n"
        "async def test_fixture(missing):\n"
        "    pass\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o",
         "trio_mode=true", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert "2 skipped" in run.stdout, run.stdout + run.stderr
    assert "nginx is not installed here" in run.stdout
    assert "caddy is not installed here" in run.stdout
    assert "python.py" not in run.stdout  # no location inside pytest itself

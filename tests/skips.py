"""Skips keep their reasons under pytest-trio.

pytest-trio runs an async test inside ``trio.run``; a ``pytest.skip(reason)`` from it (or from an
async fixture) arrives wrapped in an exception group, and the plugin raises a fresh
``pytest.skip()`` without the reason: ``make test`` then printed ``SKIPPED [13]
…/_pytest/python.py:187: Skipped`` for every front-proxy test on a machine without nginx.
The original ``Skipped`` is still the context of the fresh one; this hook puts its reason, and
the test's own location, back into the report.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from _pytest.outcomes import Skipped


def _original_skip(exc: BaseException) -> Skipped | None:
    """The ``Skipped`` with a reason inside the group ``exc`` was raised while handling."""
    todo: list[BaseException] = [e for e in (exc.__context__, exc.__cause__) if e is not None]
    while todo:
        current = todo.pop()
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        elif isinstance(current, Skipped) and current.msg:
            return current
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or call.excinfo is None or not isinstance(report.longrepr, tuple):
        return
    original = _original_skip(call.excinfo.value)
    if original is not None:
        path, lineno, _ = item.location
        report.longrepr = (path, (lineno or 0) + 1, f"Skipped: {original.msg}")

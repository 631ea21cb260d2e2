"""Log formatting (eecp.logs): both formats stamp lines in whole UTC seconds."""

from __future__ import annotations

import io
import json
import logging

import pytest

from eecp.core import logs
from eecp.core.clock import isoformat


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_lines_are_stamped_in_whole_seconds_without_filling_the_stamp_cache(fmt: str) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup_logging(fmt, "INFO", out)
        isoformat.cache_clear()
        log = logging.getLogger("eecp.test")
        for n in range(50):  # one second, 50 different float times
            record = log.makeRecord("eecp.test", logging.INFO, __file__, 1, "line %d", (n,),
                                    None)
            record.created = 1_767_225_600.0 + n / 50  # 2026-01-01T00:00:00Z and after
            log.handle(record)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = out.getvalue().splitlines()
    assert len(lines) == 50
    stamps = {json.loads(line)["ts"] if fmt == "json" else line.split(" ")[0]
              for line in lines}
    assert stamps == {"2026-01-01T00:00:00Z"}
    # resolve answers reuse isoformat's cache for their few timestamps: log lines take one
    # entry per second, not one per line
    assert isoformat.cache_info().currsize == 1

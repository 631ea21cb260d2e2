"""Which release of a library is installed, and whether a patch was written for it.

A patch of private code is right for the releases it was read and tested against and for no
other: each patch module names that range (``WRITTEN_FOR``, the same bounds as pyproject's pin)
and refuses, with a warning naming the installed version, to patch anything else. Only the
release numbers count (``0.18.0.post1`` is 0.18.0; ``0.19.0rc1`` is 0.19.0, outside ``<0.19``).
"""

from __future__ import annotations

import re
from importlib import metadata

Release = tuple[int, ...]

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``; None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> Release:
    """The leading release numbers of ``version`` (``"0.18.0rc1"`` -> ``(0, 18, 0)``)."""
    match = _RELEASE.match(version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def within(version: str | None, written_for: tuple[Release, Release]) -> bool:
    """Whether ``version`` is in ``[lowest, below)``."""
    lowest, below = written_for
    return version is not None and lowest <= release(version) < below


def describe(written_for: tuple[Release, Release]) -> str:
    """The range as pyproject writes it: ``>=0.18,<0.19``."""
    lowest, below = written_for
    return f">={'.'.join(map(str, lowest))},<{'.'.join(map(str, below))}"

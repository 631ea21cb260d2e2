"""eecp.patches.versions: which releases a patch was written for."""

from __future__ import annotations

import pytest

from eecp.patches import versions

OURS = ((0, 18), (0, 19))


@pytest.mark.parametrize(("version", "inside"), [
    ("0.18.0", True), ("0.18.12", True), ("0.18.0.post1", True), ("0.18", True),
    ("0.17.3", False), ("0.19.0", False), ("0.19.0rc1", False), ("1.0", False),
    ("", False), ("garbage", False), (None, False),
])
def test_a_version_is_within_the_range_by_its_release_numbers(
        version: str | None, inside: bool) -> None:
    assert versions.within(version, OURS) is inside


def test_the_range_reads_as_pyproject_writes_it() -> None:
    assert versions.describe(OURS) == ">=0.18,<0.19"


def test_installed_versions_come_from_the_distributions() -> None:
    assert versions.installed("hypercorn") is not None
    assert versions.installed("no-such-distribution-here") is None

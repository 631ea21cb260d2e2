"""The metrics examples/alerts.yml alerts on, scraped from a real serve() while a real agent
attests (MockClock time)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from trio.testing import MockClock

from eecp import __version__
from eecp.dev import pki as devpki
from tests.harness import (
    MINTED_AT,
    FakeAgent,
    control_plane_env,
    open_control_plane,
    open_upstreams,
    running_agent,
)


@pytest.fixture(scope="module")
def pki() -> devpki.DevPki:
    return devpki.make_pki(seed=21)


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of every sample of ``name`` in a scrape."""
    found = {}
    for match in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        found[match.group(1) or ""] = float(match.group(2))
    return found


async def test_build_store_collateral_attestation_age_and_registration_warning(
        mock_clock: MockClock, tmp_path: Path, pki: devpki.DevPki) -> None:
    async with open_upstreams(pki) as (pccs, github):
        env = control_plane_env(tmp_path, pki, pccs.url, github.url,
                                EE_REGISTRATION_TTL_DAYS="1", EE_REGISTRATION_WARN_DAYS="0.5")
        async with open_control_plane(env, pki, pccs, github) as cp:
            text = (await cp.get("/metrics")).text
            assert samples(text, "eecp_build_info") == {f'{{version="{__version__}"}}': 1.0}
            assert samples(text, "eecp_store_up") == {"": 1.0}
            assert samples(text, "eecp_collateral_next_update_timestamp_seconds") == {}
            assert samples(text, "eecp_app_attestation_age_seconds") == {}

            async with running_agent(FakeAgent(cp.ws_url, pki)) as agent:
                await agent.wait_status("attested")
                text = (await cp.get("/metrics")).text
            collateral = samples(text, "eecp_collateral_next_update_timestamp_seconds")
            [(labels, next_update)] = collateral.items()
            assert re.fullmatch(r'\{ca="platform",fmspc="[0-9A-F]{12}",tee="tdx"\}', labels)
            assert next_update == MINTED_AT + 400 * 86400  # the stand-in PCCS's collateral
            assert samples(text, "eecp_app_attestation_age_seconds") == {'{app="shop"}': 0.0}
            assert samples(text, "eecp_registrations") == {
                '{state="active"}': 1.0, '{state="warning"}': 0.0, '{state="expired"}': 0.0}

            mock_clock.jump(13 * 3600)  # the agent is gone; the registration is in its warning
            text = (await cp.get("/metrics")).text
            age = samples(text, "eecp_app_attestation_age_seconds")['{app="shop"}']
            assert age == pytest.approx(13 * 3600, abs=1)
            assert samples(text, "eecp_registrations")['{state="warning"}'] == 1.0

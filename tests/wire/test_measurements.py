"""The measurement material is built exactly as the upstream agent builds it."""

from __future__ import annotations

import json

import pytest

from eecp.core.errors import PolicyError
from eecp.wire.measurements import Measurements, measurements_from_json, report_data_for
from tests.vectors import vector


def test_upstream_allowlist_report_data_is_our_digest() -> None:
    doc = json.loads(vector("upstream/agent-attestation-allowlist.json").read_text())
    m = measurements_from_json(doc["measurements"])
    assert m.digest().hex() == doc["report_data"][:64]
    assert m.material().startswith(b"agent_dir=a7ac29d4")
    assert m.material().endswith(b"\nsealed=true")


def test_report_data_is_digest_then_nonce() -> None:
    m = Measurements("a" * 64, "b" * 64, "tag=x\nsha256=y", False)
    nonce = bytes(range(32))
    rd = report_data_for(m, nonce)
    assert len(rd) == 64 and rd[32:] == nonce and rd[:32] == m.digest()
    assert m.material() == (f"agent_dir={'a' * 64}\nagent_py={'b' * 64}\n"
                            "vm_image_id=tag=x\nsha256=y\nsealed=false").encode()
    with pytest.raises(ValueError):
        report_data_for(m, b"short")


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([], "measurements_invalid"),
        ({}, "measurements_invalid:agent_dir_sha256"),
        ({"agent_dir_sha256": "zz" * 32}, "measurements_invalid:agent_dir_sha256"),
        ({"agent_dir_sha256": "a" * 64, "agent_py_sha256": "a" * 63},
         "measurements_invalid:agent_py_sha256"),
        ({"agent_dir_sha256": "a" * 64, "agent_py_sha256": "b" * 64, "vm_image_id": ""},
         "measurements_invalid:vm_image_id"),
        ({"agent_dir_sha256": "a" * 64, "agent_py_sha256": "b" * 64, "vm_image_id": "i",
          "sealed": "true"}, "measurements_invalid:sealed"),
    ],
)
def test_invalid_measurements_are_refused(obj: object, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        measurements_from_json(obj)
    assert info.value.reason == reason


def test_hex_is_normalised_to_lower_case() -> None:
    m = measurements_from_json({"agent_dir_sha256": "A" * 64, "agent_py_sha256": "b" * 64,
                                "vm_image_id": "i", "sealed": True})
    assert m.agent_dir_sha256 == "a" * 64 and m.sealed is True

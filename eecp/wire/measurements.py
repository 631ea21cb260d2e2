"""The agent's measurement material and its binding into a quote's report_data.

The upstream agent hashes a fixed text built from its measurements and puts the SHA-256 in the
first 32 bytes of report_data; the challenge nonce fills the last 32. Both the control plane
(checking) and our agent (producing) use this module, so the two can never drift apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eecp.core.errors import PolicyError

#: the measurement keys that identify the agent's code and image (compared with the allowlist)
CODE_KEYS = ("agent_dir_sha256", "agent_py_sha256", "vm_image_id")
MAX_VM_IMAGE_ID = 1024
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Measurements:
    """What the agent reports about itself; trusted only once bound by :func:`report_data_prefix`
    into a verified quote."""

    agent_dir_sha256: str
    agent_py_sha256: str
    vm_image_id: str
    sealed: bool

    def material(self) -> bytes:
        """The exact text the upstream agent hashes (no trailing newline)."""
        return (
            f"agent_dir={self.agent_dir_sha256}\n"
            f"agent_py={self.agent_py_sha256}\n"
            f"vm_image_id={self.vm_image_id}\n"
            f"sealed={'true' if self.sealed else 'false'}"
        ).encode()

    def digest(self) -> bytes:
        """SHA-256 of :meth:`material`: the first 32 bytes of report_data."""
        return hashlib.sha256(self.material()).digest()

    def as_dict(self) -> dict[str, str | bool]:
        """The wire/JSON form, with the upstream key names."""
        return {
            "agent_dir_sha256": self.agent_dir_sha256,
            "agent_py_sha256": self.agent_py_sha256,
            "vm_image_id": self.vm_image_id,
            "sealed": self.sealed,
        }

    def get(self, key: str) -> str | bool:
        """The value of one upstream key (``sealed`` included)."""
        return self.as_dict()[key]


def measurements_from_json(obj: Any) -> Measurements:
    """Validate an agent's ``measurements`` object; ``PolicyError('measurements_invalid:<key>')``
    names the first bad field."""
    if not isinstance(obj, Mapping):
        raise PolicyError("measurements_invalid", "measurements must be an object")
    values: dict[str, Any] = {}
    for key in ("agent_dir_sha256", "agent_py_sha256"):
        value = obj.get(key)
        if not isinstance(value, str) or not _SHA256_HEX.match(value.lower()):
            raise PolicyError(f"measurements_invalid:{key}", "expected 64 hex characters")
        values[key] = value.lower()
    image = obj.get("vm_image_id")
    if not isinstance(image, str) or not image or len(image) > MAX_VM_IMAGE_ID:
        raise PolicyError("measurements_invalid:vm_image_id", "expected a non-empty string")
    sealed = obj.get("sealed")
    if not isinstance(sealed, bool):
        raise PolicyError("measurements_invalid:sealed", "expected true or false")
    return Measurements(values["agent_dir_sha256"], values["agent_py_sha256"], image, sealed)


def report_data_for(measurements: Measurements, nonce: bytes) -> bytes:
    """The 64-byte report_data an honest agent asks its TD to quote: digest ‖ nonce."""
    if len(nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    return measurements.digest() + nonce

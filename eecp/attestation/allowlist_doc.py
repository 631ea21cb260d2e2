"""Allowlists as documents: what a released app's agents must measure to be accepted. Pure.

An app's allowlist is a JSON file published as an asset of the GitHub release its agent
registers with (``repo`` + ``release_tag``); :class:`~eecp.attestation.allowlist.AllowlistSource`
fetches it. Here:

* :func:`parse_allowlist`, strict: bytes in, an immutable :class:`Allowlist` out, or
  ``AllowlistError("allowlist_malformed:<field path>")``. Nothing else ever escapes it.
* :func:`check_ref`: a repo and a tag fit to be put in a URL or a file path, or
  ``AllowlistError("allowlist_invalid_ref")`` before any request is made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from eecp.core.errors import AllowlistError

#: The upstream file is ~1.5 KiB; anything near this limit is not an allowlist, and the cap bounds
#: what a hostile or broken release can make us hold in memory (it applies after gzip decoding).
MAX_ALLOWLIST_BYTES = 1024 * 1024

MEASUREMENT_KEYS = ("agent_dir_sha256", "agent_py_sha256", "vm_image_id", "sealed")
RTMR_KEYS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")

# fullmatch, never bytes.fromhex alone: fromhex also accepts embedded whitespace.
_HEX = re.compile(r"[0-9a-fA-F]*")
# GitHub owner and repository names: letters, digits, '_', '.', '-' (owners are stricter on
# github.com, but GitHub Enterprise allows '_' in user names).
_REPO_PART = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# Tags: a conservative subset of what git allows. No '/', so a tag is always one path segment in
# both the API URL and ``local_dir/<owner>/<repo>/<tag>.json``.
_TAG = re.compile(r"[A-Za-z0-9_.+-]{1,128}")


@dataclass(frozen=True)
class Allowlist:
    """One parsed allowlist. Hex values are stored as bytes (registers) or lower-case hex
    (``measurements``), whatever case the file used."""

    #: exactly ``agent_dir_sha256``, ``agent_py_sha256`` (lower-case hex), ``vm_image_id`` (str)
    #: and ``sealed`` (bool); read-only. Excluded from the hash (a mapping proxy is unhashable);
    #: equality still compares it.
    measurements: Mapping[str, str | bool] = field(hash=False)
    report_data: bytes | None
    mrtd: bytes | None
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    version: str | None = None
    release_tag: str | None = None
    created_at: str | None = None

    @property
    def sealed(self) -> bool:
        """Whether the release is a sealed build (sealed networks refuse anything else)."""
        return self.measurements["sealed"] is True


def malformed(path: str, problem: str) -> NoReturn:
    """Raise ``allowlist_malformed:<path>`` (``path`` names the field, or ``json``,
    ``too_large``)."""
    raise AllowlistError(f"allowlist_malformed:{path}", f"{path}: {problem}")


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers reading {"sealed": false, "sealed": true} differently is how allowlist bypasses
    # happen; refuse the ambiguity instead of silently keeping the last value.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        malformed(path, "expected an object")
    return value


def _hex(value: object, path: str, nbytes: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * nbytes or not _HEX.fullmatch(value):
        malformed(path, f"expected {2 * nbytes} hex characters ({nbytes} bytes)")
    return bytes.fromhex(value)


def _optional_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        malformed(key, "expected a string")
    return value


def parse_allowlist(data: bytes) -> Allowlist:
    """Parse the upstream allowlist format strictly.

    Raises ``AllowlistError`` with reason ``allowlist_malformed:<field path>`` (for example
    ``allowlist_malformed:quote_measurements.rtmr2``, ``allowlist_malformed:json``,
    ``allowlist_malformed:too_large``) and never any other exception. Unknown fields are ignored;
    ``null`` counts as absent for optional fields.
    """
    if len(data) > MAX_ALLOWLIST_BYTES:
        malformed("too_large", f"{len(data)} bytes, limit {MAX_ALLOWLIST_BYTES}")
    try:
        doc_raw = json.loads(
            data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except _DuplicateKeyError as exc:
        malformed("json", f"duplicate key {str(exc)[:64]!r}")
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers;
        # RecursionError is deeply nested arrays.
        malformed("json", f"not valid JSON ({type(exc).__name__})")
    doc = _object(doc_raw, "json")

    meas = _object(doc.get("measurements"), "measurements")
    measurements: dict[str, str | bool] = {}
    for key in ("agent_dir_sha256", "agent_py_sha256"):
        measurements[key] = _hex(meas.get(key), f"measurements.{key}", 32).hex()
    vm_image_id = meas.get("vm_image_id")
    if not isinstance(vm_image_id, str) or not vm_image_id:
        malformed("measurements.vm_image_id", "expected a non-empty string")
    measurements["vm_image_id"] = vm_image_id
    sealed = meas.get("sealed")
    if not isinstance(sealed, bool):  # 0/1 or "true" are not booleans
        malformed("measurements.sealed", "expected true or false")
    measurements["sealed"] = sealed

    raw_report_data = doc.get("report_data")
    report_data = None if raw_report_data is None else _hex(raw_report_data, "report_data", 64)

    qm = _object(doc.get("quote_measurements"), "quote_measurements")
    r0, r1, r2, r3 = (_hex(qm.get(k), f"quote_measurements.{k}", 48) for k in RTMR_KEYS)
    raw_mrtd = qm.get("mrtd")
    mrtd = None if raw_mrtd is None else _hex(raw_mrtd, "quote_measurements.mrtd", 48)

    return Allowlist(
        measurements=MappingProxyType(measurements),
        report_data=report_data,
        mrtd=mrtd,
        rtmrs=(r0, r1, r2, r3),
        version=_optional_str(doc, "version"),
        release_tag=_optional_str(doc, "release_tag"),
        created_at=_optional_str(doc, "created_at"),
    )


def check_ref(repo: str, release_tag: str) -> tuple[str, str]:
    """Validate ``repo`` ("owner/name") and ``release_tag``; return ``(owner, name)``.

    Both end up in URL paths and file paths, so anything outside GitHub's name charset, any
    ``..`` and any extra ``/`` is refused with ``allowlist_invalid_ref`` before any I/O.
    """
    owner, sep, name = repo.partition("/")
    if (
        not sep
        or not _REPO_PART.fullmatch(owner)
        or not _REPO_PART.fullmatch(name)
        or ".." in repo
        or owner == "."
        or name == "."
    ):
        raise AllowlistError("allowlist_invalid_ref", f"repo {repo[:120]!r} is not owner/name")
    if not _TAG.fullmatch(release_tag) or ".." in release_tag or release_tag.startswith("."):
        raise AllowlistError(
            "allowlist_invalid_ref", f"release tag {release_tag[:140]!r} is not a plain tag name"
        )
    return owner, name

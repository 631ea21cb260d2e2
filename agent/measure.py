"""The agent's measurements, computed as the upstream easyenclave agent computes them.

Upstream (``posix4e/easy-enclave``, ``agent/agent.py``: ``sha256_file``, ``sha256_dir``,
``get_vm_image_id``, ``get_sealed_state``, ``build_attestation``):

* ``agent_py_sha256`` — SHA-256 of the agent's main file;
* ``agent_dir_sha256`` — one SHA-256 over the agent directory: for every regular file under
  it (``rglob``, symlinked directories not followed), in ``Path`` order (component by
  component), feed ``<relative posix path>\\n`` and then the file's bytes; files below a
  ``__pycache__``, ``.git``, ``deployments`` or ``tmp`` directory are skipped;
* ``vm_image_id`` — ``$VM_IMAGE_ID``, else the stripped text of ``/etc/easy-enclave/vm_image_id``;
* ``sealed`` — ``$SEAL_VM`` is ``1``, ``true`` or ``yes``.

One deliberate difference: upstream tests the skip names against the *absolute* path, so an
agent installed anywhere below a directory called ``tmp`` (``/tmp/...``) hashes no file at all
and every such install measures the same. We test them against the path *relative to the
agent directory*; for every install path upstream hashes sensibly the two agree.

The measurements are then bound into report_data by :mod:`eecp.wire.measurements` (shared with the
control plane). Everything here is blocking file I/O, run once at start-up before ``trio.run``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from agent.config import AgentConfig
from eecp.core.errors import ConfigError
from eecp.wire.measurements import Measurements

#: directory names whose files ``sha256_dir`` leaves out (upstream's list)
SKIP_NAMES = frozenset({"__pycache__", ".git", "deployments", "tmp"})
#: ``vm_image_id`` of an agent on the dev quote provider that was given none
DEV_VM_IMAGE_ID = "dev"
_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(root: Path) -> str:
    """Hex SHA-256 of a directory tree, upstream's scheme (see the module docstring)."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    digest = hashlib.sha256()
    # Sorting Path objects (not strings) is upstream's order: component by component, so
    # "a/b" sorts before "a-b" although "-" < "/" as characters.
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if SKIP_NAMES.intersection(relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\n")
        for chunk in _chunks(path):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in bounded pieces (an agent directory may hold large files)."""
    with path.open("rb") as src:
        while chunk := src.read(_CHUNK):
            yield chunk


def vm_image_id(config: AgentConfig) -> str:
    """``VM_IMAGE_ID``, else the image id file; the dev provider falls back to ``dev``."""
    if config.vm_image_id:
        return config.vm_image_id
    path = config.vm_image_id_file
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("EE_VM_IMAGE_ID_FILE", f"cannot read {path}: {exc}") from None
        if text:
            return text
    if config.quote_provider == "dev":
        return DEV_VM_IMAGE_ID
    raise ConfigError("VM_IMAGE_ID", f"is not set and {path} does not exist or is empty")


def measure(config: AgentConfig) -> Measurements:
    """The agent's measurements; ``ConfigError`` naming the variable when one cannot be taken."""
    try:
        agent_py = sha256_file(config.agent_file)
    except OSError as exc:
        raise ConfigError("EE_AGENT_FILE", f"cannot hash {config.agent_file}: {exc}") from None
    try:
        agent_dir = sha256_dir(config.agent_dir)
    except OSError as exc:
        raise ConfigError("EE_AGENT_DIR", f"cannot hash {config.agent_dir}: {exc}") from None
    return Measurements(agent_dir_sha256=agent_dir, agent_py_sha256=agent_py,
                        vm_image_id=vm_image_id(config), sealed=config.sealed)

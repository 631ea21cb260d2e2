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

**The measured tree is the code the agent runs.** This agent also executes modules of the
``eecp`` package — the tunnel's frames, streams and protocol, which parse everything eecp sends
it, the error types, the wsproto speedups, the dev PKI of its ``dev`` quote provider — and code
outside the measured tree is code an allowlist does not pin. So ``agent_dir_sha256`` covers the
agent directory *and* its import closure in this project: every ``eecp`` module that the
directory's Python files import (at any depth, lazy imports inside functions included), with
the package ``__init__.py`` files on the way. After the directory's files (upstream's scheme),
each such module is fed as ``<path relative to the project root>\n`` and its bytes, in path
order (:func:`import_closure`). An agent directory that imports nothing of ``eecp`` measures as
upstream would. ``eecp demo``, the benches and the tests compute allowlists with this same
:func:`measure`, so they always agree with the agent.

The measurements are then bound into report_data by :mod:`eecp.wire.measurements` (shared with the
control plane). Everything here is blocking file I/O, run once at start-up before ``trio.run``.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from pathlib import Path

from agent.config import AgentConfig
from eecp.core.errors import ConfigError
from eecp.wire.measurements import Measurements

#: directory names whose files ``sha256_dir`` leaves out (upstream's list)
SKIP_NAMES = frozenset({"__pycache__", ".git", "deployments", "tmp"})
#: the project this agent belongs to: where ``eecp`` is found (the measured import closure)
PROJECT = Path(__file__).resolve().parent.parent
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
    _feed_dir(digest, root)
    return digest.hexdigest()


def _feed_dir(digest: hashlib._Hash, root: Path) -> None:
    # Sorting Path objects (not strings) is upstream's order: component by component, so
    # "a/b" sorts before "a-b" although "-" < "/" as characters.
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if SKIP_NAMES.intersection(relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\n")
        for chunk in _chunks(path):
            digest.update(chunk)


def import_closure(root: Path, project: Path = PROJECT) -> list[Path]:
    """The ``eecp`` modules the Python files under ``root`` import, directly or through each
    other (lazy imports inside functions too), with the ``__init__.py`` of every package on
    the way; sorted. Found by reading the sources (``ast``), nothing is imported."""
    todo = [p for p in root.rglob("*.py") if not SKIP_NAMES.intersection(p.relative_to(root).parts)]
    seen: set[Path] = set()
    while todo:
        for name in _eecp_imports(todo.pop()):
            for module in _module_files(project, name):
                if module not in seen:
                    seen.add(module)
                    todo.append(module)
    return sorted(seen)


def _eecp_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from eecp.x import y``: y may be a module of package eecp.x
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "eecp" or n.startswith("eecp.")}


def _module_files(project: Path, name: str) -> list[Path]:
    """The files that importing ``name`` runs: each package's ``__init__.py`` on the way, and
    the module itself (nothing when ``name`` is an attribute, not a module)."""
    files: list[Path] = []
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        base = project.joinpath(*parts[:depth])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def sha256_measured_tree(root: Path, project: Path = PROJECT) -> str:
    """``agent_dir_sha256``: the agent directory (upstream's scheme), then its import closure
    in this project (see the module docstring)."""
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    digest = hashlib.sha256()
    _feed_dir(digest, root)
    for module in import_closure(root, project):
        digest.update(module.relative_to(project).as_posix().encode() + b"\n")
        for chunk in _chunks(module):
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
        agent_dir = sha256_measured_tree(config.agent_dir)
    except OSError as exc:
        raise ConfigError("EE_AGENT_DIR", f"cannot hash {config.agent_dir}: {exc}") from None
    return Measurements(agent_dir_sha256=agent_dir, agent_py_sha256=agent_py,
                        vm_image_id=vm_image_id(config), sealed=config.sealed)

"""Quote providers: turn 64 bytes of report_data into a TDX quote.

* :class:`ConfigfsTsmProvider` asks the TDX module through the kernel's configfs-tsm interface
  (Linux ≥ 6.7, ``/sys/kernel/config/tsm/report``): the production provider.
* :class:`DevQuoteProvider` mints quotes under a development PKI (:mod:`eecp.dev.pki`) for
  machines without TDX. eecp accepts them only when ``EE_DCAP_ROOT_CA`` names that PKI's
  ``root.pem``. It is the agent's one use of ``eecp.dev``, imported when the provider is
  built and never otherwise: a production agent does not load development code.

Failures are :class:`QuoteProviderError` with a stable reason.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import trio

from agent.config import DEFAULT_TSM_REPORT_DIR
from eecp.core.errors import EecpError

log = logging.getLogger("agent.providers")
P = ParamSpec("P")
R = TypeVar("R")

REPORT_DATA_BYTES = 64


class QuoteProviderError(EecpError):
    """No quote could be produced: ``configfs_tsm_unavailable``, ``configfs_tsm_denied``,
    ``tsm_provider_unsupported``, ``tsm_generation_conflict``, ``quote_empty``,
    ``quote_generation_failed``, ``quote_timeout``."""


class QuoteProvider(Protocol):
    """Something that can have the TD quote ``report_data``."""

    async def quote(self, report_data: bytes) -> bytes:
        """A quote whose report_data field is exactly ``report_data`` (64 bytes)."""
        ...


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes, got {len(report_data)}")


class ConfigfsTsmProvider:
    """Quotes from configfs-tsm: a fresh report entry per quote, removed afterwards.

    One quote: ``mkdir`` an entry (the kernel populates its attributes), read ``generation``,
    write ``inblob``, read ``outblob`` (the kernel asks the TDX module and the quoting enclave
    now), read ``generation`` again and ``rmdir``. The kernel increments ``generation`` on
    every write, so anything but exactly one more means someone else wrote to the entry
    between our write and our read and ``outblob`` may not be ours: we try again, up to
    ``max_attempts`` times (Documentation/ABI/testing/configfs-tsm-report).

    The four file operations are the methods ``_mkdir``, ``_write``, ``_read`` and ``_rmdir``:
    the seam where tests put a fake kernel.
    """

    def __init__(self, base: Path = DEFAULT_TSM_REPORT_DIR, *, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base = base
        self.max_attempts = max_attempts

    def available(self) -> bool:
        """Whether the configfs-tsm report directory exists (checked again on every quote)."""
        return self.base.is_dir()

    async def quote(self, report_data: bytes) -> bytes:
        """Quote ``report_data``; blocking file I/O runs in a worker thread.

        The thread is not abandoned on cancellation: reading ``outblob`` cannot be
        interrupted, and waiting for it guarantees the entry is removed before we return.
        """
        _check_report_data(report_data)
        for attempt in range(1, self.max_attempts + 1):
            quote = await trio.to_thread.run_sync(self._quote_once, report_data)
            if quote is not None:
                return quote
            log.warning("configfs-tsm generation changed under us (attempt %d of %d): "
                        "another writer raced; retrying", attempt, self.max_attempts)
        raise QuoteProviderError("tsm_generation_conflict",
                                 f"generation changed on {self.max_attempts} attempts")

    def _quote_once(self, report_data: bytes) -> bytes | None:
        """One attempt (in a worker thread): the quote, or None when another writer raced."""
        if not self.base.is_dir():
            raise QuoteProviderError(
                "configfs_tsm_unavailable",
                f"{self.base} does not exist: not a TDX guest, a kernel older than 6.7, "
                "or configfs not mounted")
        entry = self.base / f"eecp-{os.getpid()}-{secrets.token_hex(6)}"
        _os_call(self._mkdir, entry)
        try:
            return self._exchange(entry, report_data)
        finally:
            try:
                self._rmdir(entry)
            except OSError as exc:  # the quote (or the error) matters more than a stray entry
                log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)

    def _exchange(self, entry: Path, report_data: bytes) -> bytes | None:
        provider = _os_call(self._read, entry / "provider").decode(errors="replace").strip()
        if not provider.startswith("tdx"):
            raise QuoteProviderError("tsm_provider_unsupported",
                                     f"configfs-tsm provider is {provider!r}, not tdx_guest")
        before = _generation(_os_call(self._read, entry / "generation"))
        _os_call(self._write, entry / "inblob", report_data)
        quote = _os_call(self._read, entry / "outblob")
        after = _generation(_os_call(self._read, entry / "generation"))
        if after != before + 1:
            return None
        if not quote:
            raise QuoteProviderError("quote_empty", "configfs-tsm returned an empty outblob")
        return quote

    # ---- the filesystem seam --------------------------------------------------------------

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def _rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def _read(self, path: Path) -> bytes:
        return path.read_bytes()

    def _write(self, path: Path, data: bytes) -> None:
        # configfs binary attributes take the whole value in one write, committed on close
        with path.open("wb", buffering=0) as out:
            out.write(data)


def _os_call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run one configfs operation, turning ``OSError`` into a ``QuoteProviderError``."""
    try:
        return fn(*args, **kwargs)
    except PermissionError as exc:
        raise QuoteProviderError("configfs_tsm_denied",
                                 f"{exc.filename}: permission denied (run as root?)") from None
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        raise QuoteProviderError("quote_generation_failed",
                                 f"{exc.filename}: {name} {exc.strerror}") from None


def _generation(raw: bytes) -> int:
    try:
        return int(raw.decode().strip())
    except ValueError:
        raise QuoteProviderError("quote_generation_failed",
                                 f"unreadable generation {raw[:20]!r}") from None


class DevQuoteProvider:
    """Development quotes: genuine TDX v4 quotes signed under the PKI in ``pki_dir``.

    The directory is created with a fresh PKI when it holds none; point eecp's
    ``EE_DCAP_ROOT_CA`` at ``<pki_dir>/root.pem``. MRTD and RTMRs are whatever you choose
    (so they can match an allowlist's ``quote_measurements``). **Never** for production:
    anyone with the directory can mint quotes for any report_data.
    """

    def __init__(self, pki_dir: Path, *, mrtd: bytes | None = None,
                 rtmrs: tuple[bytes, bytes, bytes, bytes] | None = None,
                 fmspc: str | None = None,
                 now: Callable[[], float] = time.time, platform: str = "default") -> None:
        # here only: see the module docstring
        from eecp.dev import mint as devmint
        from eecp.dev import pki as devpki

        self._devmint = devmint
        self.pki_dir = pki_dir
        self.pki = devpki.ensure_pki(pki_dir)
        self.mrtd = devmint.DEFAULT_MRTD if mrtd is None else mrtd
        self.rtmrs = devmint.DEFAULT_RTMRS if rtmrs is None else rtmrs
        self.fmspc = devmint.DEFAULT_FMSPC if fmspc is None else fmspc
        #: one PCK leaf key per dev platform, kept in the PKI directory: every quote carries
        #: the same PPID, as a real host's do (ledger spec §21.11)
        self.pck_key = devpki.platform_pck_key(pki_dir, platform)
        #: the root certificate eecp must trust (``EE_DCAP_ROOT_CA``)
        self.root_pem_path = pki_dir / devpki.ROOT_CERT_FILE
        self._now = now

    async def quote(self, report_data: bytes) -> bytes:
        """Mint a quote over ``report_data`` (signing takes milliseconds: a worker thread)."""
        _check_report_data(report_data)
        mint = partial(self._devmint.mint_tdx_quote, self.pki, now=self._now(),
                       report_data=report_data, mrtd=self.mrtd, rtmrs=self.rtmrs,
                       fmspc=self.fmspc, pck_key=self.pck_key)
        minted = await trio.to_thread.run_sync(mint)
        return minted.quote

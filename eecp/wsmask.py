"""RFC 6455 masking in C for wsproto, the WebSocket engine under both ends of a tunnel.

Every byte an agent sends up its tunnel is masked by the agent (a WebSocket client must) and
unmasked by eecp. wsproto does both in pure Python (``XorMaskerSimple``: eight strided
``translate`` passes, about 1 GB/s), which was a fifth of each side's CPU time for a 1 MiB
response (``bench/RESULTS.md``). :func:`install` puts a masker with the same interface on
``websockets``' C ``apply_mask`` (tens of GB/s) in its place.

The replacement keeps wsproto's contract exactly: one masker per frame, fed the payload in
successive chunks, each chunk continuing the key where the last one stopped.
``tests/test_wsmask.py`` holds it to byte-for-byte the original's output. Masking keys are still
drawn by wsproto from ``os.urandom`` for every frame; only the XOR moves to C.

When ``websockets`` has no compiled speedups on this platform, :func:`install` leaves wsproto's
own masker in place (its pure-Python fallback is slower than wsproto's) and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import wsproto.frame_protocol as frame_protocol

log = logging.getLogger("eecp.wsmask")

_ORIGINAL = frame_protocol.XorMaskerSimple


def _load_apply_mask() -> Callable[[bytes | bytearray, bytes], bytes] | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError:
        return None
    return apply_mask


_apply_mask = _load_apply_mask()


class CMasker:
    """wsproto's ``XorMaskerSimple`` interface over a C XOR: one frame's masking key, rotated
    after each chunk by its length so that the next chunk continues the key stream."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        """``data`` XORed with the key stream from where the previous chunk ended."""
        if not data:
            return bytes(data)
        assert _apply_mask is not None  # install() uses this class only when it loaded
        masked = _apply_mask(data, self._key)
        turn = len(masked) % 4  # bytes, not items: a memoryview of wider items counts less
        if turn:
            self._key = self._key[turn:] + self._key[:turn]
        return masked


def available() -> bool:
    """Whether the C masker can be installed here."""
    return _apply_mask is not None


def installed() -> bool:
    """Whether wsproto masks with :class:`CMasker` now."""
    return frame_protocol.XorMaskerSimple is CMasker  # type: ignore[comparison-overlap]


def install() -> bool:
    """Make wsproto mask and unmask with :class:`CMasker` (idempotent, process-wide).

    False, and wsproto's own masker stays, when ``websockets``' speedups are missing."""
    if installed():
        return True
    if not available():
        log.info("websockets' C speedups are missing: WebSocket masking stays in pure Python")
        return False
    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    return True


def uninstall() -> None:
    """Put wsproto's own masker back (for tests that compare the two)."""
    frame_protocol.XorMaskerSimple = _ORIGINAL  # type: ignore[misc]

"""Two of wsproto's hot paths made cheap, for the WebSocket engine under both ends of a tunnel;
:func:`install` puts both in place (process-wide, idempotent).

1. **Masking in C.** Every byte an agent sends up its tunnel is masked by the agent (a
   WebSocket client must) and unmasked by eecp. wsproto does both in pure Python
   (``XorMaskerSimple``: eight strided ``translate`` passes, about 1 GB/s), which was a fifth
   of each side's CPU time for a 1 MiB response (``bench/RESULTS.md``). :class:`CMasker` has the
   same interface on ``websockets``' C ``apply_mask`` (tens of GB/s). It keeps wsproto's
   contract exactly: one masker per frame, fed the payload in successive chunks, each chunk
   continuing the key where the last one stopped.
2. **Frames written with two copies instead of six.** ``FrameProtocol._serialize_frame`` copies
   a payload into a bytearray twice, masks a third copy, joins header and payload into a fourth
   and a fifth, and ``Connection.send`` makes a sixth: for each 64 KiB DATA frame of a 1 MiB
   response, 384 KiB of memory traffic. :func:`_serialize_frame` writes the same bytes with
   one copy to mask (a client's frame) and one to join. A connection with an extension
   (permessage-deflate, which rewrites the payload) keeps wsproto's own way.

``tests/patches/test_wsproto_speedups.py`` holds both to byte-for-byte the originals' output.
Masking keys are still drawn from ``os.urandom`` for every frame, as wsproto does; only the
work moves.

When ``websockets`` has no compiled speedups on this platform, :func:`install` leaves wsproto as
it is (its pure-Python fallback is slower than wsproto's) and says so once. Both replace
wsproto internals read in wsproto 1.3.2, so :func:`install` patches only the releases in
:data:`WRITTEN_FOR` (pyproject pins the same range), and otherwise logs a warning naming the
version and leaves wsproto as it is.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import wsproto.frame_protocol as frame_protocol
from wsproto.frame_protocol import FrameProtocol, Opcode

from eecp.patches import versions

log = logging.getLogger("eecp.patches.wsproto")

#: the wsproto releases the two replacements were written for: 1.3.x (pyproject: the same pin)
WRITTEN_FOR: tuple[versions.Release, versions.Release] = ((1, 3), (1, 4))

_ORIGINAL = frame_protocol.XorMaskerSimple
_ORIGINAL_SERIALIZE = FrameProtocol._serialize_frame
_LENGTH16 = struct.Struct("!BBH")
_LENGTH64 = struct.Struct("!BBQ")
_MASKED = 0x80


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


def _serialize_frame(self: FrameProtocol, opcode: Opcode, payload: bytes | bytearray = b"",
                     fin: bool = True) -> bytes:
    """``FrameProtocol._serialize_frame``'s bytes, with one copy to mask and one to join."""
    if self.extensions:
        return bytes(_ORIGINAL_SERIALIZE(self, opcode, payload, fin))
    if not isinstance(payload, bytes | bytearray):  # a memoryview counts bytes, not items
        payload = bytes(payload)
    length = len(payload)
    first = (0x80 if fin else 0) | int(opcode)
    mask_bit = _MASKED if self.client else 0
    if length <= 125:
        header = bytes((first, mask_bit | length))
    elif opcode.iscontrol():
        raise ValueError("payload too long for control frame")  # wsproto's own refusal
    elif length <= 0xFFFF:
        header = _LENGTH16.pack(first, mask_bit | 126, length)
    else:
        header = _LENGTH64.pack(first, mask_bit | 127, length)
    if not self.client:
        return b"".join((header, payload))
    assert _apply_mask is not None  # installed only when it loaded
    key = os.urandom(4)  # RFC 6455 5.3: a fresh, unpredictable key per frame
    return b"".join((header, key, _apply_mask(payload, key) if payload else b""))


def available() -> bool:
    """Whether the C masker can be installed here."""
    return _apply_mask is not None


def installed() -> bool:
    """Whether wsproto masks with :class:`CMasker` and writes frames with
    :func:`_serialize_frame` now."""
    serialize: Any = FrameProtocol._serialize_frame
    return (frame_protocol.XorMaskerSimple is CMasker  # type: ignore[comparison-overlap]
            and serialize is _serialize_frame)


def install() -> bool:
    """Make wsproto mask with :class:`CMasker` and write frames with :func:`_serialize_frame`
    (idempotent, process-wide).

    False, and wsproto stays as it is, when this wsproto is not one they were written for or
    ``websockets``' speedups are missing."""
    if installed():
        return True
    version = versions.installed("wsproto")
    if not versions.within(version, WRITTEN_FOR):
        log.warning("wsproto %s: eecp's speedups were written for wsproto %s and are not "
                    "installed (masking and frame writing stay wsproto's own)", version,
                    versions.describe(WRITTEN_FOR))
        return False
    if not available():
        log.info("websockets' C speedups are missing: WebSocket masking stays in pure Python")
        return False
    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    FrameProtocol._serialize_frame = _serialize_frame  # type: ignore[assignment,method-assign]
    log.info("wsproto %s: masking in C and the two-copy frame writer installed", version)
    return True


def uninstall() -> None:
    """Put wsproto's own masker and serializer back (for tests that compare them)."""
    frame_protocol.XorMaskerSimple = _ORIGINAL  # type: ignore[misc]
    FrameProtocol._serialize_frame = _ORIGINAL_SERIALIZE  # type: ignore[method-assign]

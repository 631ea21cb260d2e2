"""eecp's only look at a WebSocket's bytes: where the app's frames begin and end
(:class:`eecp.dataplane.websocket.FrameTracker`), whatever the chunks the bytes come in."""

from __future__ import annotations

import struct

import pytest

from eecp.dataplane.websocket import FrameTracker, close_frame


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + struct.pack("!H", size) + payload
    return bytes((first, 127)) + struct.pack("!Q", size) + payload


STREAM = b"".join([server_frame(0x1, b"frag", fin=False), server_frame(0x9, b"ping"),
                   server_frame(0x0, b"ment"), server_frame(0x2, bytes(300)),
                   server_frame(0x2, bytes(70_000)), server_frame(0x1, b"")])


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000, len(STREAM)])
def test_boundaries_are_found_in_any_chunking(chunk: int) -> None:
    tracker = FrameTracker()
    boundaries = []
    for at in range(0, len(STREAM), chunk):
        tracker.feed(STREAM[at:at + chunk])
        boundaries.append(tracker.at_boundary)
    assert tracker.at_boundary and not tracker.closed
    if chunk == 1:  # the last byte of the 4-byte "frag" frame's payload is byte 6
        assert boundaries[5] is True and boundaries[4] is False


def test_a_close_from_the_app_is_noticed() -> None:
    tracker = FrameTracker()
    tracker.feed(server_frame(0x2, b"x") + close_frame(1000, "bye")[:3])
    assert tracker.closed and not tracker.at_boundary


def test_eecps_close_frame() -> None:
    frame = close_frame(1001, "health_fail")
    assert frame == b"\x88\x0d\x03\xe9health_fail"
    assert len(close_frame(1011, "x" * 500)) == 2 + 125  # a control frame's limit

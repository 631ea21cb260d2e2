"""eecp.patches.wsproto: the C masker and the frame serializer produce exactly what wsproto's
own do (chunk by chunk, frame by frame), a wsproto client and server with them installed
exchange messages intact, and a wsproto they were not written for is left alone."""

from __future__ import annotations

import array
import logging
import os
from collections.abc import Iterator

import pytest
import wsproto.frame_protocol as frame_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from eecp.patches import versions
from eecp.patches import wsproto as wsproto_speedups

pytestmark = pytest.mark.skipif(not wsproto_speedups.available(),
                                reason="websockets has no C speedups here")


@pytest.fixture
def c_masker() -> Iterator[None]:
    was = wsproto_speedups.installed()
    assert wsproto_speedups.install()
    assert wsproto_speedups.installed()
    yield
    # as it was (the conftest installs it for the session, as every eecp process does)
    if was:
        assert wsproto_speedups.install()
    else:
        wsproto_speedups.uninstall()


@given(key=st.binary(min_size=4, max_size=4),
       chunks=st.lists(st.binary(max_size=70), max_size=8))
@settings(max_examples=300)
def test_same_bytes_as_wsprotos_masker_across_chunks(key: bytes, chunks: list[bytes]) -> None:
    # a frame's payload arrives in pieces: each continues the key where the last one stopped
    ours, theirs = wsproto_speedups.CMasker(key), wsproto_speedups._ORIGINAL(bytearray(key))
    for chunk in chunks:
        assert bytes(ours.process(chunk)) == bytes(theirs.process(bytearray(chunk)))


def test_a_memoryview_of_wider_items_rotates_the_key_by_bytes() -> None:
    key, data = os.urandom(4), array.array("H", range(3))  # 3 items, 6 bytes
    ours, theirs = wsproto_speedups.CMasker(key), wsproto_speedups._ORIGINAL(bytearray(key))
    assert ours.process(memoryview(data)) == bytes(theirs.process(bytearray(data.tobytes())))
    assert ours.process(b"abcdefg") == bytes(theirs.process(bytearray(b"abcdefg")))


def test_masking_twice_with_one_key_is_the_identity() -> None:
    data = os.urandom(65_537)
    key = os.urandom(4)
    masked = wsproto_speedups.CMasker(key).process(data)
    assert masked != data
    assert wsproto_speedups.CMasker(key).process(masked) == data


def _handshake() -> tuple[WSConnection, WSConnection]:
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="eecp", target="/v1/tunnel")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client, server


def _received(conn: WSConnection) -> bytes:
    return b"".join(bytes(e.data) for e in conn.events() if isinstance(e, BytesMessage))


def test_wsproto_uses_it_both_ways_and_messages_arrive_intact(c_masker: None) -> None:
    assert frame_protocol.XorMaskerSimple is wsproto_speedups.CMasker  # type: ignore[comparison-overlap]
    client, server = _handshake()
    payload = os.urandom(200_003)
    wire = client.send(BytesMessage(data=payload))
    assert payload not in wire  # masked on the wire, as RFC 6455 requires of a client
    # fed in odd-sized pieces, so the server unmasks in chunks that rotate the key
    received = b""
    for at in range(0, len(wire), 7_919):
        server.receive_data(wire[at:at + 7_919])
        received += _received(server)
    assert received == payload
    client.receive_data(server.send(BytesMessage(data=payload)))
    assert _received(client) == payload


def test_a_client_with_wsprotos_masker_talks_to_a_server_with_ours(c_masker: None) -> None:
    client, server = _handshake()
    payload = os.urandom(70_001)
    wsproto_speedups.uninstall()
    wire = client.send(BytesMessage(data=payload))
    assert wsproto_speedups.install()
    server.receive_data(wire)
    assert _received(server) == payload


def test_install_is_idempotent_and_uninstall_restores_wsproto(c_masker: None) -> None:
    assert wsproto_speedups.install()
    wsproto_speedups.uninstall()
    assert frame_protocol.XorMaskerSimple is wsproto_speedups._ORIGINAL
    assert not wsproto_speedups.installed()


def test_install_refuses_a_wsproto_it_was_not_written_for(
        c_masker: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    wsproto_speedups.uninstall()
    monkeypatch.setattr(versions, "installed", lambda distribution: "1.4.0")
    with caplog.at_level(logging.WARNING, logger="eecp.patches.wsproto"):
        assert not wsproto_speedups.install()
    assert not wsproto_speedups.installed()
    assert frame_protocol.XorMaskerSimple is wsproto_speedups._ORIGINAL
    assert "wsproto 1.4.0" in caplog.text and ">=1.3,<1.4" in caplog.text


# ---- the frame serializer ---------------------------------------------------------------------

_LENGTHS = st.sampled_from([0, 1, 125, 126, 127, 65_535, 65_536, 70_001]) | st.integers(0, 300)


def _both_serialized(monkeypatch: pytest.MonkeyPatch, protocol: frame_protocol.FrameProtocol,
                     opcode: frame_protocol.Opcode, payload: bytes | bytearray | memoryview,
                     fin: bool) -> tuple[bytes, bytes]:
    """Ours and wsproto's frame for the same masking key."""
    key = os.urandom(4)
    monkeypatch.setattr(os, "urandom", lambda n: key[:n])
    ours = wsproto_speedups._serialize_frame(protocol, opcode, payload, fin)  # type: ignore[arg-type]
    theirs = bytes(wsproto_speedups._ORIGINAL_SERIALIZE(protocol, opcode, payload, fin))  # type: ignore[arg-type]
    monkeypatch.undo()
    return ours, theirs


@given(client=st.booleans(), fin=st.booleans(), length=_LENGTHS,
       opcode=st.sampled_from([frame_protocol.Opcode.BINARY, frame_protocol.Opcode.TEXT,
                               frame_protocol.Opcode.CONTINUATION]))
@settings(max_examples=200)
def test_the_serializer_writes_wsprotos_bytes(client: bool, fin: bool, length: int,
                                              opcode: frame_protocol.Opcode) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        protocol = frame_protocol.FrameProtocol(client=client, extensions=[])
        payload = os.urandom(length)
        ours, theirs = _both_serialized(monkeypatch, protocol, opcode, payload, fin)
        assert ours == theirs
        if not client:
            assert ours.endswith(payload)
        elif length >= 16:  # a client's frame is masked (a few bytes may match by chance)
            assert payload not in ours


def test_the_serializer_takes_bytearrays_and_memoryviews_of_wider_items(
        monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = frame_protocol.FrameProtocol(client=True, extensions=[])
    for payload in (bytearray(os.urandom(300)), memoryview(array.array("H", range(200)))):
        ours, theirs = _both_serialized(monkeypatch, protocol, frame_protocol.Opcode.BINARY,
                                        payload, True)
        assert ours == theirs
        assert len(ours) == 2 + 2 + 4 + memoryview(payload).nbytes  # 16-bit length, key


@pytest.mark.parametrize("opcode", [frame_protocol.Opcode.PING, frame_protocol.Opcode.PONG,
                                    frame_protocol.Opcode.CLOSE])
def test_control_frames_match_and_a_long_one_is_refused_as_wsproto_refuses_it(
        monkeypatch: pytest.MonkeyPatch, opcode: frame_protocol.Opcode) -> None:
    for client in (True, False):
        protocol = frame_protocol.FrameProtocol(client=client, extensions=[])
        ours, theirs = _both_serialized(monkeypatch, protocol, opcode, os.urandom(125), True)
        assert ours == theirs
        for serialize in (wsproto_speedups._serialize_frame,
                          wsproto_speedups._ORIGINAL_SERIALIZE):
            with pytest.raises(ValueError, match="too long for control frame"):
                serialize(protocol, opcode, os.urandom(126), True)  # type: ignore[arg-type]


def test_a_connection_with_permessage_deflate_keeps_wsprotos_own_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from wsproto.extensions import PerMessageDeflate

    def deflating() -> frame_protocol.FrameProtocol:  # each its own compressor state
        deflate = PerMessageDeflate()
        deflate.finalize(str(deflate.offer()))
        return frame_protocol.FrameProtocol(client=True, extensions=[deflate])

    payload = b"compressible " * 1000
    key = os.urandom(4)
    monkeypatch.setattr(os, "urandom", lambda n: key[:n])
    ours = wsproto_speedups._serialize_frame(deflating(), frame_protocol.Opcode.BINARY, payload)
    theirs = wsproto_speedups._ORIGINAL_SERIALIZE(deflating(), frame_protocol.Opcode.BINARY,
                                                  payload)
    assert ours == bytes(theirs)
    assert ours[0] & 0x40  # RSV1: compressed
    assert len(ours) < len(payload) // 10


def test_wsproto_connections_with_the_serializer_exchange_messages(c_masker: None) -> None:
    assert wsproto_speedups.installed()
    client, server = _handshake()
    for payload in (b"", os.urandom(125), os.urandom(65_536), os.urandom(200_003)):
        server.receive_data(client.send(BytesMessage(data=payload)))
        assert _received(server) == payload
        client.receive_data(server.send(BytesMessage(data=payload)))
        assert _received(client) == payload

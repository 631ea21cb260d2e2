"""eecp.wsmask: the C masker produces exactly what wsproto's own does, chunk by chunk, and a
wsproto client and server with it installed exchange messages intact."""

from __future__ import annotations

import array
import os
from collections.abc import Iterator

import pytest
import wsproto.frame_protocol as frame_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from eecp import wsmask

pytestmark = pytest.mark.skipif(not wsmask.available(), reason="websockets has no C speedups here")


@pytest.fixture
def c_masker() -> Iterator[None]:
    was = wsmask.installed()
    assert wsmask.install()
    assert wsmask.installed()
    yield
    if not was:
        wsmask.uninstall()


@given(key=st.binary(min_size=4, max_size=4),
       chunks=st.lists(st.binary(max_size=70), max_size=8))
@settings(max_examples=300)
def test_same_bytes_as_wsprotos_masker_across_chunks(key: bytes, chunks: list[bytes]) -> None:
    # a frame's payload arrives in pieces: each continues the key where the last one stopped
    ours, theirs = wsmask.CMasker(key), wsmask._ORIGINAL(bytearray(key))
    for chunk in chunks:
        assert bytes(ours.process(chunk)) == bytes(theirs.process(bytearray(chunk)))


def test_a_memoryview_of_wider_items_rotates_the_key_by_bytes() -> None:
    key, data = os.urandom(4), array.array("H", range(3))  # 3 items, 6 bytes
    ours, theirs = wsmask.CMasker(key), wsmask._ORIGINAL(bytearray(key))
    assert ours.process(memoryview(data)) == bytes(theirs.process(bytearray(data.tobytes())))
    assert ours.process(b"abcdefg") == bytes(theirs.process(bytearray(b"abcdefg")))


def test_masking_twice_with_one_key_is_the_identity() -> None:
    data = os.urandom(65_537)
    key = os.urandom(4)
    masked = wsmask.CMasker(key).process(data)
    assert masked != data
    assert wsmask.CMasker(key).process(masked) == data


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
    assert frame_protocol.XorMaskerSimple is wsmask.CMasker  # type: ignore[comparison-overlap]
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
    wsmask.uninstall()
    wire = client.send(BytesMessage(data=payload))
    assert wsmask.install()
    server.receive_data(wire)
    assert _received(server) == payload


def test_install_is_idempotent_and_uninstall_restores_wsproto(c_masker: None) -> None:
    assert wsmask.install()
    wsmask.uninstall()
    assert frame_protocol.XorMaskerSimple is wsmask._ORIGINAL
    assert not wsmask.installed()

"""The stream multiplexer (eecp.streams): two Muxes back to back over an in-memory tunnel.

Each direction of the "tunnel" is a memory channel drained by a pump task that feeds the other
mux, so sending and receiving are asynchronous as over a WebSocket. Every frame that crosses is
recorded, so tests can count DATA bytes in flight per stream. Every test is bounded by
``WAIT`` seconds (a hang fails instead of blocking the run); nothing asserts on speed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from eecp.core.errors import ProtocolError
from eecp.dataplane import proxy
from eecp.wire.frames import (
    FIN,
    INITIAL_WINDOW,
    MAX_BATCH,
    DataFrame,
    EndFrame,
    Frame,
    FrameType,
    RequestHeadFrame,
    ResetFrame,
    ResponseHeadFrame,
    WindowFrame,
    decode_frame,
    encode_batch,
    encode_frame,
    split_message,
)
from eecp.wire.httpmsg import RequestHead, ResponseHead
from eecp.wire.streams import FEED_BUDGET, Mux, Stream, StreamError

WAIT = 10.0
GET = RequestHead("GET", "/", [])
OK = ResponseHead(200, [])


def decode_all(data: bytes) -> list[Frame]:
    """The frames of one message (one, or a BATCH's)."""
    return [decode_frame(encoded) for encoded in split_message(data)]


@dataclass
class Wire:
    """What crossed one direction of the tunnel."""

    frames: list[Frame] = field(default_factory=list)
    data_bytes: Counter[int] = field(default_factory=Counter)
    #: frames per message, in order (more than one: a BATCH)
    messages: list[int] = field(default_factory=list)

    def record(self, data: bytes) -> None:
        decoded = decode_all(data)
        self.messages.append(len(decoded))
        for frame in decoded:
            self.frames.append(frame)
            if isinstance(frame, DataFrame):
                self.data_bytes[frame.stream_id] += len(frame.data)

    def of(self, kind: type[Any]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


@dataclass
class Pair:
    """eecp's mux (the opener) and the agent's, connected."""

    eecp: Mux
    agent: Mux
    to_agent: Wire
    to_eecp: Wire
    #: the most body bytes each side ever held unconsumed (sampled after every frame fed)
    max_buffered: Counter[str] = field(default_factory=Counter)


def _link(wire: Wire, tx: trio.MemorySendChannel[bytes]) -> Callable[[bytes], Awaitable[None]]:
    async def send_message(data: bytes) -> None:
        wire.record(data)
        await tx.send(data)
    return send_message


async def _pump(rx: trio.MemoryReceiveChannel[bytes], mux: Mux, name: str,
                max_buffered: Counter[str]) -> None:
    async for data in rx:
        await mux.feed(data)
        max_buffered[name] = max(max_buffered[name], mux.buffered)


@asynccontextmanager
async def mux_pair(eecp: dict[str, Any] | None = None, agent: dict[str, Any] | None = None,
                   *, wait: float = WAIT) -> AsyncIterator[Pair]:
    """Two muxes back to back; the whole ``async with`` must finish within ``wait``."""
    to_agent_tx, to_agent_rx = trio.open_memory_channel[bytes](math.inf)
    to_eecp_tx, to_eecp_rx = trio.open_memory_channel[bytes](math.inf)
    to_agent, to_eecp = Wire(), Wire()
    pair = Pair(Mux(_link(to_agent, to_agent_tx), opener=True, **(eecp or {})),
                Mux(_link(to_eecp, to_eecp_tx), opener=False, **(agent or {})),
                to_agent, to_eecp)
    with trio.fail_after(wait):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, to_agent_rx, pair.agent, "agent", pair.max_buffered)
            nursery.start_soon(_pump, to_eecp_rx, pair.eecp, "eecp", pair.max_buffered)
            yield pair
            nursery.cancel_scope.cancel()


async def read_all(stream: Stream) -> bytes:
    out = bytearray()
    while (chunk := await stream.receive()) is not None:
        out += chunk
    return bytes(out)


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ from stream to stream (and from offset to offset)."""
    block = bytes((seed * 7 + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


async def echo_server(mux: Mux, *, headers: list[tuple[str, str]] | None = None) -> None:
    """Accept streams forever; answer each with its request body, reversed chunks and all."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream, head = await mux.accept_stream()
            except StreamError:
                return

            async def serve(stream: Stream = stream, head: RequestHead = head) -> None:
                # a client may leave early (RESET) or the tunnel close: that ends this one
                with contextlib.suppress(StreamError):
                    await _echo(stream, head, headers)
            nursery.start_soon(serve)


async def _echo(stream: Stream, head: RequestHead, headers: list[tuple[str, str]] | None
                ) -> None:
    async with stream:
        body = await read_all(stream)
        await stream.send_head(ResponseHead(200, headers or head.headers))
        await stream.send(body)
        await stream.end()


# ---- basics -----------------------------------------------------------------------------------


async def test_one_exchange_then_both_slots_are_free() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(RequestHead("POST", "/echo", [("A", "1")]))
        assert stream.id == 1 and p.eecp.in_flight == 1
        accepted, head = await p.agent.accept_stream()
        assert head == RequestHead("POST", "/echo", [("A", "1")])
        await stream.send(b"hello")
        await stream.end()
        assert await read_all(accepted) == b"hello"
        await accepted.send_head(ResponseHead(201, [("B", "2")]))
        await accepted.send(b"world")
        await accepted.end()
        assert await stream.receive_head() == ResponseHead(201, [("B", "2")])
        assert await read_all(stream) == b"world"
        assert stream.finished and accepted.finished
        await trio.testing.wait_all_tasks_blocked()
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0
        assert p.to_agent.of(ResetFrame) == [] and p.to_eecp.of(ResetFrame) == []


async def test_a_small_exchange_with_separate_ends_is_five_messages_and_needs_no_credit(
        ) -> None:
    async with mux_pair() as p:  # windows of 256 KiB both ways: more than the initial credit
        stream = await p.eecp.open_stream(GET)
        await stream.end()
        accepted, _ = await p.agent.accept_stream()
        assert await read_all(accepted) == b""
        await accepted.send_head(OK)
        await accepted.send(b"x" * 100)
        await accepted.end()
        # the whole answer is in before eecp reads (as when it arrives in one TCP read): a
        # body whose END is here needs no more credit (one read sooner, it would get a top-up)
        await trio.testing.wait_all_tasks_blocked()
        assert await stream.receive_head() == OK
        assert await read_all(stream) == b"x" * 100
        await trio.testing.wait_all_tasks_blocked()
        assert [type(f) for f in p.to_agent.frames] == [RequestHeadFrame, EndFrame]
        assert [type(f) for f in p.to_eecp.frames] == [ResponseHeadFrame, DataFrame, EndFrame]


async def test_repeated_headers_keep_their_order_both_ways() -> None:
    request = [("Cookie", "a=1"), ("X-Dup", "1"), ("x-dup", "2"), ("X-Dup", "3")]
    response = [("Set-Cookie", "a=1; Path=/"), ("Vary", "A"), ("Set-Cookie", "b=2"),
                ("set-cookie", "c=3")]
    async with mux_pair() as p, trio.open_nursery() as nursery:
        nursery.start_soon(echo_server, p.agent)
        async with await p.eecp.open_stream(RequestHead("GET", "/", request)) as stream:
            await stream.end()
            assert (await stream.receive_head()).headers == request
            assert await read_all(stream) == b""
        async with await p.eecp.open_stream(RequestHead("GET", "/", response)) as stream:
            await stream.end()
            assert (await stream.receive_head()).headers == response
            assert await read_all(stream) == b""
        p.agent.close()  # ends the echo server


async def test_many_concurrent_streams_interleave_and_each_gets_its_own_bytes() -> None:
    count, size = 40, 300 * 1024
    results: dict[int, bytes] = {}
    async with (mux_pair(eecp={"max_streams": count}, agent={"max_streams": count}) as p,
                trio.open_nursery() as servers):
        servers.start_soon(echo_server, p.agent)

        async def client(n: int) -> None:
            async with await p.eecp.open_stream(RequestHead("PUT", f"/{n}", [])) as stream:
                await stream.send(pattern(n, size))
                await stream.end()
                await stream.receive_head()
                results[n] = await read_all(stream)

        async with trio.open_nursery() as clients:
            for n in range(count):
                clients.start_soon(client, n)
        p.agent.close()
    assert all(results[n] == pattern(n, size) for n in range(count))
    # frame by frame, not stream by stream: consecutive DATA frames switch streams often
    ids = [f.stream_id for f in p.to_eecp.of(DataFrame)]
    switches = sum(1 for a, b in itertools.pairwise(ids) if a != b)
    assert switches > count
    assert len(set(ids)) == count


# ---- flow control -----------------------------------------------------------------------------


async def test_a_reader_that_does_not_read_stops_its_sender_and_only_its_sender() -> None:
    window = 256 * 1024
    big = pattern(1, 4 * 1024 * 1024)
    async with mux_pair(eecp={"initial_window": window}, agent={"initial_window": window}) as p:
        stalled = await p.eecp.open_stream(RequestHead("POST", "/stalled", []))
        stalled_peer, _ = await p.agent.accept_stream()
        other = await p.eecp.open_stream(RequestHead("POST", "/other", []))
        other_peer, _ = await p.agent.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalled.send, big)  # nobody reads stalled_peer yet
            await trio.testing.wait_all_tasks_blocked()
            # the other stream, on the same mux, flows through completely meanwhile
            nursery.start_soon(other.send, big)
            assert await _read_exactly(other_peer, len(big)) == big
            await trio.testing.wait_all_tasks_blocked()
            # a reader that never read granted nothing beyond the protocol's initial credit:
            # the stalled one sent exactly that, and the receiver holds no more
            assert p.to_agent.data_bytes[stalled.id] == INITIAL_WINDOW
            assert stalled_peer.buffered == INITIAL_WINDOW
            # reading resumes it, and the receiver never holds more than the window
            received = bytearray()
            while len(received) < len(big):
                assert stalled_peer.buffered <= window
                assert p.to_agent.data_bytes[stalled.id] - len(received) <= window
                chunk = await stalled_peer.receive()
                assert chunk is not None
                received += chunk
            assert received == big
        assert max(len(f.data) for f in p.to_agent.of(DataFrame)) <= 64 * 1024
        assert p.max_buffered["agent"] <= 2 * window  # two streams, each within its window
        p.eecp.close()


async def _read_exactly(stream: Stream, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = await stream.receive()
        assert chunk is not None
        out += chunk
    return bytes(out)


async def test_a_window_at_most_the_initial_credit_needs_no_top_up() -> None:
    async with mux_pair(eecp={"initial_window": 1024}, agent={"initial_window": 1024}) as p:
        assert p.eecp.window == INITIAL_WINDOW  # smaller windows are moot: the peer may send
        stream = await p.eecp.open_stream(GET)  # that much before it hears from us
        peer, _ = await p.agent.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send, bytes(200 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            assert p.to_agent.data_bytes[stream.id] == INITIAL_WINDOW
            assert p.to_agent.of(WindowFrame) == [] and p.to_eecp.of(WindowFrame) == []
            assert len(await _read_exactly(peer, 200 * 1024)) == 200 * 1024
        p.eecp.close()


async def test_small_frames_split_and_credit_comes_back_as_the_reader_reads() -> None:
    async with mux_pair(eecp={"max_frame": 1000}, agent={"max_frame": 1000}) as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        await peer.send_head(OK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send, pattern(3, 1_000_000))
            assert await stream.receive_head() == OK
            assert await _read_exactly(stream, 1_000_000) == pattern(3, 1_000_000)
        assert {len(f.data) for f in p.to_eecp.of(DataFrame)} == {1000}
        # the opener tops the credit up to its window with the first chunk it reads, then
        # grants half-windows as it reads
        grants = [f.increment for f in p.to_agent.of(WindowFrame)]
        assert grants[0] == 256 * 1024 - INITIAL_WINDOW
        assert all(g >= 128 * 1024 for g in grants[1:])
        p.eecp.close()


def recording_agent_mux() -> tuple[Mux, list[Frame]]:
    """An agent-side mux whose every written frame lands, decoded, in the returned list."""
    sent: list[Frame] = []

    async def capture(data: bytes) -> None:
        sent.extend(decode_all(data))

    return Mux(capture, opener=False), sent


async def test_a_peer_that_overruns_its_window_gets_the_stream_reset() -> None:
    agent, sent = recording_agent_mux()
    await agent.feed(encode_frame(RequestHeadFrame(1, GET)))
    await agent.feed(encode_frame(DataFrame(1, bytes(INITIAL_WINDOW))))  # all its credit
    # not accepted yet, so no more credit was granted: one byte more is a violation
    await agent.feed(encode_frame(DataFrame(1, b"x")))
    assert sent == [ResetFrame(1, "flow_control_violation")]
    assert agent.in_flight == 0
    with trio.move_on_after(0.01) as nothing_to_accept:
        await agent.accept_stream()  # a reset stream is not handed out
    assert nothing_to_accept.cancelled_caught
    # a WINDOW that overflows the credit counter is one too
    await agent.feed(encode_frame(RequestHeadFrame(3, GET)))
    with trio.fail_after(WAIT):
        stream, _ = await agent.accept_stream()
    await agent.feed(encode_frame(WindowFrame(3, 2**32 - 1)))
    assert sent[-1] == ResetFrame(3, "flow_control_violation")
    with pytest.raises(StreamError, match="flow_control_violation"):
        await stream.receive()


# ---- resets -----------------------------------------------------------------------------------


async def test_a_reset_by_the_agent_reaches_every_call_on_eecps_side() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expect_error, stream.receive_head, "stream_reset:backend_down")
            nursery.start_soon(_expect_error, stream.receive, "stream_reset:backend_down")
            nursery.start_soon(_expect_error, lambda: stream.send(bytes(1 << 20)),
                               "stream_reset:backend_down")  # waits for credit, then fails
            await trio.testing.wait_all_tasks_blocked()
            await peer.reset("backend_down")
        with pytest.raises(StreamError, match="stream_reset:backend_down"):
            await peer.receive()  # this side's calls fail too
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0
        await stream.aclose()  # nothing more to say: no RESET back
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_agent.of(ResetFrame) == []
        p.eecp.close()


async def test_a_reset_by_eecp_wakes_the_agents_reader_and_sender() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        await peer.send_head(OK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expect_error, peer.receive, "stream_reset:client_gone")
            nursery.start_soon(_expect_error, lambda: peer.send(bytes(1 << 20)),
                               "stream_reset:client_gone")
            nursery.start_soon(_expect_error, lambda: _wait_failed_raising(peer),
                               "stream_reset:client_gone")
            await trio.testing.wait_all_tasks_blocked()
            await stream.reset("client_gone")
        p.eecp.close()


async def test_a_complete_body_stays_readable_after_a_reset_or_close() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        await peer.send_head(OK)
        await peer.send(b"all of it")
        await peer.end()
        await peer.aclose()  # eecp never ended its body: the agent resets ("closed")
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_eecp.of(ResetFrame) == [ResetFrame(stream.id, "closed")]
        assert await stream.receive_head() == OK
        assert await read_all(stream) == b"all of it"
        with pytest.raises(StreamError, match="stream_reset:closed"):
            await stream.send(b"more")
        # an incomplete body is not: it is dropped with the reset
        second = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        await peer.send_head(OK)
        await peer.send(b"half")
        await trio.testing.wait_all_tasks_blocked()
        await peer.reset("backend_error")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(StreamError, match="stream_reset:backend_error"):
            await second.receive()
        p.eecp.close()


async def test_leaving_a_stream_unfinished_resets_it_and_frees_its_slot() -> None:
    async with mux_pair() as p:
        with pytest.raises(RuntimeError, match="boom"):
            async with await p.eecp.open_stream(GET) as stream:
                peer, _ = await p.agent.accept_stream()
                raise RuntimeError("boom")
        assert p.eecp.in_flight == 0
        with pytest.raises(StreamError, match="stream_reset:closed"):
            await peer.receive()
        assert p.agent.in_flight == 0
        assert p.to_agent.of(ResetFrame) == [ResetFrame(stream.id, "closed")]
        p.eecp.close()


async def test_a_finished_stream_holds_its_slot_until_its_body_is_read_or_dropped() -> None:
    # a response complete at eecp but not yet read by a slow client still counts: otherwise
    # every slow client would hold a window of its own, and the tunnel's bound of
    # max_streams windows would not hold
    async with mux_pair({"max_streams": 1}, {"max_streams": 1}) as p:
        for done in ("read", "release", "aclose"):
            stream = await p.eecp.open_stream(GET, end=True)
            served, _ = await p.agent.accept_stream()
            await served.send_head(OK)
            await served.send(b"a" * 1000 + b"b" * 1000, end=True)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.finished and served.finished
            assert (p.eecp.in_flight, p.eecp.buffered, p.agent.in_flight) == (1, 2000, 0)
            with trio.move_on_after(0.2) as waited:  # no slot for the next request
                await p.eecp.open_stream(GET, end=True)
            assert waited.cancelled_caught
            assert await stream.receive_head() == OK
            if done == "read":
                assert await read_all(stream) == b"a" * 1000 + b"b" * 1000
            elif done == "release":
                stream.release()
            else:
                await stream.aclose()
            assert (p.eecp.in_flight, p.eecp.buffered) == (0, 0)
        assert p.to_agent.of(ResetFrame) == []  # a finished stream has nothing to reset
        p.eecp.close()


async def test_a_stream_reset_before_it_was_accepted_is_never_accepted() -> None:
    async with mux_pair(agent={"max_streams": 1}) as p:
        async with await p.eecp.open_stream(GET):
            pass  # left at once: RESET closed follows the head
        await trio.testing.wait_all_tasks_blocked()
        assert p.agent.in_flight == 0  # its slot is free again
        second = await p.eecp.open_stream(GET)
        accepted, _ = await p.agent.accept_stream()
        assert accepted.id == second.id
        p.eecp.close()


async def test_the_agent_refuses_streams_beyond_its_own_limit() -> None:
    async with mux_pair(eecp={"max_streams": 3}, agent={"max_streams": 2}) as p:
        streams = [await p.eecp.open_stream(GET) for _ in range(3)]
        with pytest.raises(StreamError, match="stream_reset:too_many_streams"):
            await streams[2].receive_head()
        assert p.agent.in_flight == 2
        p.eecp.close()


# ---- FIN: the end on the last frame ------------------------------------------------------------


async def test_a_small_exchange_with_fin_is_three_messages_and_needs_no_credit() -> None:
    async with mux_pair() as p:  # windows of 256 KiB both ways: more than the initial credit
        stream = await p.eecp.open_stream(GET, end=True)
        accepted, head = await p.agent.accept_stream()
        assert head == GET
        assert accepted.ready and await accepted.receive() is None  # no request body
        # eecp reads as soon as anything arrives: with a separate END it would top the
        # agent's credit up after the first chunk; the FIN came with the chunk, so it does not
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_response, stream, OK, b"x" * 100)
            await trio.testing.wait_all_tasks_blocked()
            await accepted.send_head(OK)
            await trio.testing.wait_all_tasks_blocked()
            await accepted.send(b"x" * 100, end=True)
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_agent.frames == [RequestHeadFrame(1, GET, fin=True)]
        assert p.to_eecp.frames == [ResponseHeadFrame(1, OK), DataFrame(1, b"x" * 100, fin=True)]
        assert stream.finished and accepted.finished
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0


async def _read_response(stream: Stream, head: ResponseHead, body: bytes) -> None:
    assert await stream.receive_head() == head
    assert await read_all(stream) == body


async def test_a_bodyless_exchange_with_fin_is_two_messages() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET, end=True)
        accepted, _ = await p.agent.accept_stream()
        assert await accepted.receive() is None
        no_content = ResponseHead(204, [("X", "1")])
        await accepted.send_head(no_content, end=True)
        assert accepted.finished and p.agent.in_flight == 0  # ended both ways: slot free
        assert await stream.receive_head() == no_content
        assert await stream.receive() is None
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_agent.frames == [RequestHeadFrame(1, GET, fin=True)]
        assert p.to_eecp.frames == [ResponseHeadFrame(1, no_content, fin=True)]
        assert stream.finished and p.eecp.in_flight == 0
        # the side that ended may not send more; ending again is a no-op, as after end()
        with pytest.raises(RuntimeError, match="ended already"):
            await stream.send(b"late")
        await stream.end()
        await stream.aclose()  # finished: no RESET
        await trio.testing.wait_all_tasks_blocked()
        assert len(p.to_agent.frames) == 1 and len(p.to_eecp.frames) == 1


async def test_send_with_end_marks_only_the_last_frame_and_stays_within_credit() -> None:
    window, size = 256 * 1024, 1_000_000
    async with mux_pair(eecp={"max_frame": 16 * 1024}, agent={"initial_window": window}) as p:
        stream = await p.eecp.open_stream(RequestHead("PUT", "/blob", []))
        peer, _ = await p.agent.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: stream.send(pattern(5, size), end=True))
            await trio.testing.wait_all_tasks_blocked()
            # a reader that has not read holds only the initial credit, FIN or not
            assert p.to_agent.data_bytes[stream.id] == INITIAL_WINDOW
            assert not peer.ready or peer.buffered == INITIAL_WINDOW
            received = bytearray()
            while (chunk := await peer.receive()) is not None:
                assert peer.buffered <= window
                assert p.to_agent.data_bytes[stream.id] - len(received) <= window
                received += chunk
        assert received == pattern(5, size)
        data = p.to_agent.of(DataFrame)
        assert [f.fin for f in data] == [False] * (len(data) - 1) + [True]
        assert {len(f.data) for f in data[:-1]} == {16 * 1024}
        assert p.to_agent.of(EndFrame) == []
        assert p.to_eecp.of(WindowFrame)[0].increment == window - INITIAL_WINDOW  # the top-up
        assert p.max_buffered["agent"] <= window
        # the request side is done: answering finishes the stream and frees both slots
        await peer.send_head(OK, end=True)
        assert await stream.receive_head() == OK and await stream.receive() is None
        await trio.testing.wait_all_tasks_blocked()
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0
        assert p.to_agent.of(ResetFrame) == [] and p.to_eecp.of(ResetFrame) == []


async def test_send_nothing_with_end_is_a_plain_end() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        await stream.send(b"", end=True)
        assert await peer.receive() is None
        with pytest.raises(RuntimeError, match="ended already"):
            await stream.send(b"x", end=True)
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_agent.frames == [RequestHeadFrame(1, GET), EndFrame(1)]
        p.eecp.close()


async def test_an_end_racing_a_send_with_end_writes_no_second_end() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET)
        peer, _ = await p.agent.accept_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: stream.send(bytes(INITIAL_WINDOW + 10), end=True))
            await trio.testing.wait_all_tasks_blocked()  # out of credit, holding the lock
            nursery.start_soon(stream.end)  # behind it, for the lock
            await trio.testing.wait_all_tasks_blocked()
            assert len(await read_all(peer)) == INITIAL_WINDOW + 10
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_agent.of(EndFrame) == []
        assert [f.fin for f in p.to_agent.of(DataFrame)] == [False, True]
        p.eecp.close()


@pytest.mark.parametrize("last", ["end", "data", "head"])
async def test_a_slot_is_free_for_the_next_stream_as_soon_as_its_end_is_on_the_wire(last: str
                                                                                    ) -> None:
    """eecp frees a slot when the agent's END (or FIN) arrives and may open the next stream at
    once; that head can reach the agent before the agent's ending write has returned."""
    release = trio.Event()
    to_agent_tx, to_agent_rx = trio.open_memory_channel[bytes](math.inf)
    to_eecp_tx, to_eecp_rx = trio.open_memory_channel[bytes](math.inf)

    async def agent_send(data: bytes) -> None:
        await to_eecp_tx.send(data)
        if data[0] & FIN or isinstance(decode_frame(data), EndFrame):
            await release.wait()  # the write is out, but the sender has not been resumed yet

    eecp = Mux(to_agent_tx.send, opener=True, max_streams=1)
    agent = Mux(agent_send, opener=False, max_streams=1)
    seen: Counter[str] = Counter()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, to_agent_rx, agent, "agent", seen)
            nursery.start_soon(_pump, to_eecp_rx, eecp, "eecp", seen)
            try:
                first = await eecp.open_stream(GET, end=True)
                served, _ = await agent.accept_stream()
                # each blocks in its (shielded) ending write until released
                if last == "head":
                    nursery.start_soon(lambda: served.send_head(OK, end=True))
                elif last == "data":
                    await served.send_head(OK)
                    nursery.start_soon(lambda: served.send(b"body", end=True))
                else:
                    await served.send_head(OK)
                    nursery.start_soon(served.end)
                assert await first.receive_head() == OK
                assert await read_all(first) == (b"body" if last == "data" else b"")
                assert eecp.in_flight == 0  # the end arrived: eecp's slot is free
                second = await eecp.open_stream(GET, end=True)
                with trio.move_on_after(0.2):
                    await second.receive_head()  # no answer comes, and no reset either
                assert not second.finished and agent.in_flight == 1
                accepted, _ = await agent.accept_stream()
                assert accepted.id == second.id
            finally:
                release.set()
            nursery.cancel_scope.cancel()


async def test_an_answer_that_overtakes_the_fin_write_still_frees_the_openers_slot() -> None:
    """eecp's FIN'd request head is on the wire but its write has not returned when the whole
    answer arrives: the stream is finished at once, not leaked."""
    release = trio.Event()
    to_agent_tx, to_agent_rx = trio.open_memory_channel[bytes](math.inf)
    to_eecp_tx, to_eecp_rx = trio.open_memory_channel[bytes](math.inf)

    async def eecp_send(data: bytes) -> None:
        await to_agent_tx.send(data)
        if data[0] & FIN:
            await release.wait()

    eecp = Mux(eecp_send, opener=True, max_streams=1)
    agent = Mux(to_eecp_tx.send, opener=False)
    seen: Counter[str] = Counter()
    opened: list[Stream] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, to_agent_rx, agent, "agent", seen)
            nursery.start_soon(_pump, to_eecp_rx, eecp, "eecp", seen)

            async def open_first() -> None:
                opened.append(await eecp.open_stream(GET, end=True))

            nursery.start_soon(open_first)
            try:
                served, _ = await agent.accept_stream()
                await served.send_head(OK, end=True)
                await trio.testing.wait_all_tasks_blocked()
                assert opened == []  # open_stream is still writing
                assert eecp.in_flight == 0  # yet the stream is finished, its slot free
            finally:
                release.set()  # (a shielded write would outlast fail_after)
            await trio.testing.wait_all_tasks_blocked()
            first = opened[0]
            assert first.finished
            assert await first.receive_head() == OK and await first.receive() is None
            second = await eecp.open_stream(GET)  # the only slot is free
            assert second.id == 2
            nursery.cancel_scope.cancel()


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ([], None, [(RequestHeadFrame, True)]),
    ([("content-length", "6")], [b"abc", b"", b"def"],
     [(RequestHeadFrame, False), (DataFrame, False), (DataFrame, True)]),
    ([("transfer-encoding", "chunked")], [b"abc", b"def"],
     [(RequestHeadFrame, False), (DataFrame, False), (DataFrame, False), (EndFrame, False)]),
    ([("content-length", "9")], [b"abc", b"def"],  # cut short: END, and the agent says so
     [(RequestHeadFrame, False), (DataFrame, False), (DataFrame, False), (EndFrame, False)]),
    ([("content-length", "6"), ("content-length", "7")], [b"abc", b"def"],  # conflicting
     [(RequestHeadFrame, False), (DataFrame, False), (DataFrame, False), (EndFrame, False)]),
], ids=["no body", "content-length", "chunked", "short", "two lengths"])
async def test_the_proxy_ends_a_request_on_its_last_frame_when_it_knows_it(
        headers: list[tuple[str, str]], body: list[bytes] | None,
        expected: list[tuple[type[Any], bool]]) -> None:
    """eecp's side (eecp.proxy): a GET is one message; an upload whose Content-Length is
    reached ends on that chunk; one of unknown length ends with END once it is exhausted."""
    async with mux_pair() as p, trio.open_nursery() as nursery:
        agent = SimpleNamespace(mux=p.eecp, seed=None, in_flight=0)
        received: list[bytes] = []

        async def serve() -> None:
            stream, _ = await p.agent.accept_stream()
            received.append(await read_all(stream))
            await stream.send_head(OK)
            await stream.send(b"pong", end=True)

        nursery.start_soon(serve)
        head = RequestHead("POST", "/", headers)
        source = None if body is None else _chunks(body)
        attempt = proxy._attempt(WAIT, agent, head, source)  # type: ignore[arg-type]
        async with attempt as upstream:
            assert upstream.head == OK
            assert [chunk async for chunk in upstream.chunks()] == [b"pong"]
        await trio.testing.wait_all_tasks_blocked()
        assert received == [b"".join(body or [])]
        assert [(type(f), getattr(f, "fin", False)) for f in p.to_agent.frames] == expected
        # (the agent, reading an upload as it comes, may top eecp's credit up: a WINDOW)
        answer = [f for f in p.to_eecp.frames if not isinstance(f, WindowFrame)]
        assert answer == [ResponseHeadFrame(1, OK), DataFrame(1, b"pong", fin=True)]
        if body is None:  # a GET with a small answer: three messages in all
            assert len(p.to_agent.frames) + len(p.to_eecp.frames) == 3
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0
        assert p.to_agent.of(ResetFrame) == []  # finished both ways: nothing to reset


async def test_the_proxy_refuses_a_body_longer_than_its_content_length() -> None:
    async with mux_pair() as p:
        agent = SimpleNamespace(mux=p.eecp, seed=None, in_flight=0)
        head = RequestHead("POST", "/", [("Content-Length", "3")])
        with pytest.raises(proxy.ProxyError) as caught:
            async with proxy._attempt(WAIT, agent, head,  # type: ignore[arg-type]
                                      _chunks([b"abc", b"d"])):
                pytest.fail("no answer can come")
        assert (caught.value.http_status, caught.value.reason) == (400, "invalid_request")
        await trio.testing.wait_all_tasks_blocked()
        # what was declared went, with its FIN; the extra byte did not; the stream is reset,
        # saying whose fault it was
        assert p.to_agent.of(DataFrame) == [DataFrame(1, b"abc", fin=True)]
        assert p.to_agent.of(ResetFrame) == [ResetFrame(1, "bad_request")]
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0


async def test_a_fin_beyond_the_credit_resets_the_stream_and_is_not_an_end() -> None:
    agent, sent = recording_agent_mux()
    await agent.feed(encode_frame(RequestHeadFrame(1, GET)))
    stream, _ = await agent.accept_stream()
    await agent.feed(encode_frame(DataFrame(1, bytes(INITIAL_WINDOW))))
    await agent.feed(encode_frame(DataFrame(1, b"x", fin=True)))
    assert sent == [ResetFrame(1, "flow_control_violation")]
    assert agent.in_flight == 0
    with pytest.raises(StreamError, match="flow_control_violation"):
        await stream.receive()  # the body never completed: none of it is handed out


# ---- the tunnel closing -----------------------------------------------------------------------


async def test_close_fails_everything_in_flight_at_once_and_wakes_every_waiter() -> None:
    async with mux_pair(eecp={"max_streams": 3}) as p:
        streams = [await p.eecp.open_stream(GET) for _ in range(3)]
        peers = [(await p.agent.accept_stream())[0] for _ in range(3)]
        await peers[1].send_head(OK)
        await peers[2].send_head(OK)
        eecp_calls: list[Callable[[], Awaitable[object]]] = [
            streams[0].receive_head, streams[2].receive, lambda: p.eecp.open_stream(GET),
            lambda: streams[1].send(bytes(1 << 20)),  # nobody reads streams[1]: no credit
            lambda: _wait_failed_raising(streams[0])]
        agent_calls: list[Callable[[], Awaitable[object]]] = [
            peers[0].receive, p.agent.accept_stream, lambda: peers[1].send(bytes(1 << 20))]
        woken: list[str] = []
        async with trio.open_nursery() as nursery:
            for call in eecp_calls:
                nursery.start_soon(_expect_error, call, "tunnel_closed", woken)
            for call in agent_calls:
                nursery.start_soon(_expect_error, call, "agent_gone", woken)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            p.eecp.close()
            p.agent.close("agent_gone")
            await trio.testing.wait_all_tasks_blocked()
            # at once: every waiter is woken without any time passing or frame crossing
            assert len(woken) == len(eecp_calls) + len(agent_calls)
        assert p.eecp.in_flight == 0 and p.agent.in_flight == 0
        for call in (streams[0].receive, lambda: p.eecp.open_stream(GET), streams[1].end):
            with pytest.raises(StreamError, match="tunnel_closed"):
                await call()
        await streams[0].aclose()  # harmless once the tunnel is gone
        await streams[0].reset("late")


async def test_cancelled_callers_still_see_their_frames_written_whole() -> None:
    """A frame in the outbox is committed: its caller waits for it even when cancelled, the
    one writing (shielded) and the one queued behind it (parked) alike, and the cancellation
    shows after, between frames (the streams are opened, and their holders must release
    them)."""
    send = GatedSend()  # a tunnel whose socket buffer is full
    mux = Mux(send, opener=True, initial_window=INITIAL_WINDOW)
    opened: list[Stream] = []
    callers = [trio.CancelScope(), trio.CancelScope()]

    async def open_one(caller: trio.CancelScope) -> None:
        with caller:
            opened.append(await mux.open_stream(GET))
            await trio.sleep_forever()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for caller in callers:  # the first writes, the second queues behind it
                nursery.start_soon(open_one, caller)
                await trio.testing.wait_all_tasks_blocked()
            for caller in callers:
                caller.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert send.messages == [] and opened == []  # still waiting, despite the cancel
            send.gate.set()
    assert send.messages == [[RequestHeadFrame(1, GET)], [RequestHeadFrame(2, GET)]]
    assert all(caller.cancelled_caught for caller in callers)
    assert sorted(stream.id for stream in opened) == [1, 2]
    for stream in opened:
        await stream.aclose()
    assert [type(f) for m in send.messages[2:] for f in m] == [ResetFrame, ResetFrame]
    assert mux.in_flight == 0


async def test_close_abandons_a_write_that_cannot_finish() -> None:
    gave_up: list[bool] = []

    async def stuck(data: bytes) -> None:
        await trio.sleep(2 * WAIT)  # a peer that stopped reading, until the tunnel gives up
        gave_up.append(False)  # (only if close() did not abandon this write; then fail)

    mux = Mux(stuck, opener=True)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_expect_error, lambda: mux.open_stream(GET), "tunnel_closed")
            await trio.testing.wait_all_tasks_blocked()
            assert mux.in_flight == 1
            mux.close()
    assert mux.in_flight == 0 and gave_up == []


async def test_a_failing_transport_closes_the_mux() -> None:
    async def broken(data: bytes) -> None:
        raise OSError("connection reset")

    mux = Mux(broken, opener=True)
    with pytest.raises(StreamError, match="tunnel_closed"):
        await mux.open_stream(GET)
    assert mux.closed and mux.in_flight == 0


# ---- batching: frames that queue up while a write is in progress share one message ------------


class GatedSend:
    """A transport whose writes wait for ``gate`` (a socket buffer that is full), recording
    each message as the frames it carried."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.messages: list[list[Frame]] = []
        self.raw: list[bytes] = []

    async def __call__(self, data: bytes) -> None:
        await self.gate.wait()
        self.raw.append(data)
        self.messages.append(decode_all(data))


async def test_frames_queued_behind_a_write_go_out_together_in_order() -> None:
    send = GatedSend()
    mux = Mux(send, opener=True)
    opened: list[int] = []

    async def open_one(n: int) -> None:
        stream = await mux.open_stream(RequestHead("GET", f"/{n}", []), end=True)
        opened.append(stream.id)  # only once its message is out

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(open_one, n)
                await trio.testing.wait_all_tasks_blocked()  # in this order
            assert opened == [] and send.messages == []
            send.gate.set()
    # the first went out alone at once; the five that queued behind it, as one BATCH
    assert [len(m) for m in send.messages] == [1, 5]
    assert send.raw[0][0] == 0x81 and send.raw[1][0] == FrameType.BATCH
    paths = [f.head.path for m in send.messages for f in m if isinstance(f, RequestHeadFrame)]
    assert paths == [f"/{n}" for n in range(6)] and sorted(opened) == [1, 2, 3, 4, 5, 6]
    # the peer takes a BATCH apart: six streams, in order
    agent = Mux(_capture, opener=False)
    for message in send.raw:
        await agent.feed(message)
    accepted = [(await agent.accept_stream())[1].path for _ in range(6)]
    assert accepted == paths


async def test_a_batch_takes_at_most_batch_frames_and_the_rest_follows() -> None:
    """A backlog crosses in several messages, so the peer can start on its first part."""
    send = GatedSend()
    mux = Mux(send, opener=True, batch_frames=4)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for n in range(11):
                nursery.start_soon(partial(mux.open_stream, RequestHead("GET", f"/{n}", []),
                                           end=True))
                await trio.testing.wait_all_tasks_blocked()
            send.gate.set()
    assert [len(m) for m in send.messages] == [1, 4, 4, 2]
    paths = [f.head.path for m in send.messages for f in m if isinstance(f, RequestHeadFrame)]
    assert paths == [f"/{n}" for n in range(11)]


async def test_a_writer_writes_for_others_only_until_its_own_frame_is_out() -> None:
    send = GatedSend()
    mux = Mux(send, opener=True, batch_frames=1)
    returned: dict[str, int] = {}

    async def open_one(name: str) -> None:
        await mux.open_stream(RequestHead("GET", f"/{name}", []), end=True)
        returned[name] = len(send.raw)  # messages out when this call returned

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for name in "abc":
                nursery.start_soon(open_one, name)
                await trio.testing.wait_all_tasks_blocked()
            send.gate.set()
    assert [m[0].head.path for m in send.messages] == ["/a", "/b", "/c"]  # type: ignore[attr-defined]
    assert returned == {"a": 1, "b": 2, "c": 3}  # each one wrote (or waited for) its own


async def _random_writes(seed: int) -> None:
    rnd = random.Random(seed)
    written: list[int] = []
    fail_at = rnd.choice([None, 5, 20])

    async def send(data: bytes) -> None:
        for _ in range(rnd.randint(0, 2)):
            await trio.lowlevel.checkpoint()
        if fail_at is not None and len(written) >= fail_at:
            raise OSError("connection reset")
        written.extend(decode_frame(e).stream_id for e in split_message(data))

    mux = Mux(send, opener=True, max_streams=1000, batch_frames=rnd.randint(1, 5))
    opened: list[int] = []

    async def open_one() -> None:
        with trio.CancelScope() as scope:
            if rnd.random() < 0.3:  # cancelled while queued, parked or writing
                scope.deadline = trio.current_time() + rnd.random() / 1000
            with contextlib.suppress(StreamError):
                opened.append((await mux.open_stream(GET, end=True)).id)

    with trio.fail_after(WAIT):  # nobody is left parked forever
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(open_one)
                if rnd.random() < 0.3:
                    await trio.lowlevel.checkpoint()
            if rnd.random() < 0.2:
                await trio.lowlevel.checkpoint()
                mux.close()
    assert written == sorted(written), seed  # in the order the frames were queued
    assert set(opened) <= set(written), seed  # an open that returned was written
    if not mux.closed:
        assert len(written) == 40, seed  # nothing stranded in the outbox
    assert (mux._parked == [] and mux._outbox == []) or mux.closed, seed


async def test_random_writers_cancellations_and_failures_keep_order_and_lose_nothing() -> None:
    for seed in range(300):
        await _random_writes(seed)


class _Interrupt(BaseException):
    pass


async def test_a_base_exception_in_a_write_closes_the_mux() -> None:
    """Not only the transport's errors: the batch left the outbox, the tunnel is unusable."""
    gate = trio.Event()
    calls: list[int] = []

    async def interrupted(data: bytes) -> None:
        calls.append(len(split_message(data)))
        await gate.wait()
        raise _Interrupt

    mux = Mux(interrupted, opener=True, batch_frames=2)
    errors: list[str] = []

    async def open_one() -> None:
        try:
            await mux.open_stream(GET, end=True)
        except StreamError as exc:
            errors.append(exc.reason)

    with pytest.raises(BaseExceptionGroup) as caught, trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(open_one)
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert caught.value.subgroup(_Interrupt) is not None
    assert mux.closed and calls == [1] and errors == ["tunnel_closed"] * 4
    with pytest.raises(StreamError, match="tunnel_closed"):
        await mux.open_stream(GET)


async def test_a_cancelled_sender_stops_between_frames() -> None:
    written: list[Frame] = []

    async def capture(data: bytes) -> None:
        written.extend(decode_all(data))
        await trio.lowlevel.checkpoint()

    agent = Mux(capture, opener=False)
    await agent.feed(encode_frame(RequestHeadFrame(1, GET, fin=True)))
    stream, _ = await agent.accept_stream()
    await stream.send_head(OK)
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time()  # cancelled before the body's first frame
        await stream.send(bytes(INITIAL_WINDOW), end=True)
    assert scope.cancelled_caught
    assert [type(f) for f in written] == [ResponseHeadFrame]


async def test_a_batch_never_exceeds_max_batch() -> None:
    send = GatedSend()
    mux = Mux(send, opener=False)
    chunk = bytes(20_000)
    for stream_id in range(1, 9):
        await mux.feed(encode_frame(RequestHeadFrame(stream_id, GET, fin=True)))
    streams = [(await mux.accept_stream())[0] for _ in range(8)]
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(partial(stream.send_head, OK, body=chunk, end=True))
                await trio.testing.wait_all_tasks_blocked()
            send.gate.set()
    # 1 alone, then 3 per message (4 would be 80 KiB), then the last one
    assert [len(m) for m in send.messages] == [1, 3, 3, 1]
    assert all(len(raw) <= 5 + MAX_BATCH for raw in send.raw)
    assert [f.stream_id for m in send.messages for f in m] == list(range(1, 9))
    assert mux.in_flight == 0


async def test_close_fails_every_frame_still_queued_and_writes_none_of_them() -> None:
    send = GatedSend()
    mux = Mux(send, opener=True)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(_expect_error, lambda: mux.open_stream(GET), "tunnel_closed")
            await trio.testing.wait_all_tasks_blocked()
            mux.close()
            send.gate.set()
    assert send.messages == [] and mux.in_flight == 0


async def test_a_write_failure_fails_every_frame_of_its_batch() -> None:
    gate = trio.Event()
    calls: list[int] = []

    async def breaks_on_the_second(data: bytes) -> None:
        calls.append(len(decode_all(data)))
        await gate.wait()
        if len(calls) == 2:
            raise OSError("connection reset")

    mux = Mux(breaks_on_the_second, opener=True)
    errors: list[str] = []

    async def open_one() -> None:
        try:
            await mux.open_stream(GET, end=True)
        except StreamError as exc:
            errors.append(exc.reason)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(open_one)
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert calls == [1, 3] and errors == ["tunnel_closed"] * 3
    assert mux.closed and mux.in_flight == 0


async def test_an_unknown_frame_inside_a_batch_is_skipped_only_where_allowed(
        caplog: pytest.LogCaptureFixture) -> None:
    unknown = struct.pack(">BI", 0x3E, 1) + b"from a newer peer"
    message = encode_batch([encode_frame(RequestHeadFrame(1, GET, fin=True)),
                            *[unknown] * 500, encode_frame(RequestHeadFrame(2, GET, fin=True))])
    agent = Mux(_capture, opener=False, skip_unknown=True)
    with caplog.at_level(logging.WARNING, logger="eecp.streams"):
        await agent.feed(message)
    assert [(await agent.accept_stream())[0].id for _ in range(2)] == [1, 2]
    # one line for the message, not one per frame: a batch would turn into a log flood
    warnings = [r.getMessage() for r in caplog.records if r.name == "eecp.streams"]
    assert len(warnings) == 1 and "ignoring 500 frame(s) of unknown type" in warnings[0]
    strict = Mux(_capture, opener=False)
    with pytest.raises(ProtocolError, match="invalid_frame:unknown_type"):
        await strict.feed(message)


async def test_many_streams_at_once_share_messages_end_to_end() -> None:
    async with mux_pair() as p, trio.open_nursery() as nursery:
        nursery.start_soon(echo_server, p.agent)
        bodies: dict[int, bytes] = {}

        async def call(n: int) -> None:
            async with await p.eecp.open_stream(GET) as stream:
                await stream.send(pattern(n, 100), end=True)
                await stream.receive_head()
                bodies[n] = await read_all(stream)

        async with trio.open_nursery() as calls:
            for n in range(50):
                calls.start_soon(call, n)
        nursery.cancel_scope.cancel()
    assert bodies == {n: pattern(n, 100) for n in range(50)}
    # frames did share messages, both ways
    assert max(p.to_agent.messages) > 1 and max(p.to_eecp.messages) > 1
    assert len(p.to_agent.messages) < len(p.to_agent.frames)


# ---- slots and ids ----------------------------------------------------------------------------


async def test_the_next_open_waits_for_a_free_slot() -> None:
    async with mux_pair(eecp={"max_streams": 2}) as p:
        first = await p.eecp.open_stream(GET)
        second = await p.eecp.open_stream(GET)
        third: list[Stream] = []

        async def open_third() -> None:
            third.append(await p.eecp.open_stream(GET))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_third)
            await trio.testing.wait_all_tasks_blocked()
            assert third == [] and p.eecp.in_flight == 2
            # finishing a stream both ways frees its slot
            peer, _ = await p.agent.accept_stream()
            await first.end()
            await peer.send_head(OK)
            await peer.end()
            assert await read_all(peer) == b""
            await first.receive_head()
            assert await first.receive() is None
        assert [s.id for s in (first, second, third[0])] == [1, 2, 3]
        # a caller bounds the wait itself (eecp answers 503 agent_busy)
        with trio.move_on_after(0.05) as busy:
            await p.eecp.open_stream(GET)
        assert busy.cancelled_caught and p.eecp.in_flight == 2
        p.eecp.close()


async def test_ids_wrap_around_but_are_never_reused_while_open() -> None:
    async with mux_pair() as p:
        p.eecp._next_id = 2**32 - 2  # as after four billion streams
        ids = []
        for _ in range(2):
            ids.append((await p.eecp.open_stream(GET)).id)
            await p.agent.accept_stream()
        still_open = await p.eecp.open_stream(GET)
        await p.agent.accept_stream()
        p.eecp._next_id = still_open.id  # the next candidate is taken: it is skipped
        skipped = await p.eecp.open_stream(GET)
        assert ids == [2**32 - 2, 2**32 - 1] and still_open.id == 1 and skipped.id == 2
        p.eecp.close()


# ---- garbage --------------------------------------------------------------------------------


async def _capture(data: bytes) -> None:
    pass


@pytest.mark.parametrize(("opener", "frames", "reason"), [
    (True, [RequestHeadFrame(1, GET)], "unexpected_frame:request_head"),
    (False, [ResponseHeadFrame(1, OK)], "unexpected_frame:response_head"),
    (False, [RequestHeadFrame(1, GET), RequestHeadFrame(1, GET)],
     "unexpected_frame:request_head"),
    (False, [RequestHeadFrame(1, GET), EndFrame(1), DataFrame(1, b"x")],
     "unexpected_frame:data"),
    (False, [RequestHeadFrame(1, GET), EndFrame(1), EndFrame(1)], "unexpected_frame:end"),
    (False, [RequestHeadFrame(1, GET, fin=True), DataFrame(1, b"x")], "unexpected_frame:data"),
    (False, [RequestHeadFrame(1, GET, fin=True), EndFrame(1)], "unexpected_frame:end"),
    (False, [RequestHeadFrame(1, GET), DataFrame(1, b"x", fin=True), EndFrame(1)],
     "unexpected_frame:end"),
    (False, [RequestHeadFrame(1, GET), DataFrame(1, b"x", fin=True), DataFrame(1, b"y")],
     "unexpected_frame:data"),
], ids=["head to opener", "response head to acceptor", "id in use", "data after end",
        "end twice", "data after head fin", "end after head fin", "end after data fin",
        "data after data fin"])
async def test_frames_out_of_order_are_protocol_errors(opener: bool, frames: list[Frame],
                                                       reason: str) -> None:
    mux = Mux(_capture, opener=opener)
    with pytest.raises(ProtocolError) as caught:
        for frame in frames:
            await mux.feed(encode_frame(frame))
    assert caught.value.reason == reason and caught.value.close_code == 4005


async def test_out_of_order_on_the_opener_and_garbage_bytes() -> None:
    mux = Mux(_capture, opener=True)
    stream = await mux.open_stream(GET)
    with pytest.raises(ProtocolError, match="unexpected_frame:data"):
        await mux.feed(encode_frame(DataFrame(stream.id, b"before the head")))
    await mux.feed(encode_frame(ResponseHeadFrame(stream.id, OK, fin=True)))
    with pytest.raises(ProtocolError, match="unexpected_frame:data"):
        await mux.feed(encode_frame(DataFrame(stream.id, b"after the head's FIN")))
    with pytest.raises(ProtocolError, match="invalid_frame:unknown_type"):
        await mux.feed(b"\x00\x01binary")
    with pytest.raises(ProtocolError, match="invalid_frame:short"):
        await mux.feed(b"\x03")


async def test_frames_for_finished_streams_are_dropped() -> None:
    mux = Mux(_capture, opener=True)
    for frame in (DataFrame(9, b"late"), EndFrame(9), ResetFrame(9, "late"),
                  WindowFrame(9, 10), ResponseHeadFrame(9, OK)):
        await mux.feed(encode_frame(frame))
    assert mux.in_flight == 0
    mux.close()
    await mux.feed(b"garbage after close is ignored too")


async def test_heads_the_peer_would_refuse_are_not_sent() -> None:
    sent: list[bytes] = []

    async def capture(data: bytes) -> None:
        sent.append(data)

    mux = Mux(capture, opener=True, max_head_bytes=100)
    for head in (RequestHead("GET", "/" + "a" * 200, []),
                 RequestHead("GET", "/", [("X", "a\r\nInjected: 1")])):
        with pytest.raises(StreamError, match="invalid_head"):
            await mux.open_stream(head)
    assert sent == [] and mux.in_flight == 0
    acceptor = Mux(capture, opener=False)
    await acceptor.feed(encode_frame(RequestHeadFrame(1, GET)))
    stream, _ = await acceptor.accept_stream()
    with pytest.raises(StreamError, match="invalid_head"):
        await stream.send_head(ResponseHead(200, [("Bad Name", "x")]))
    with pytest.raises(RuntimeError):
        await stream.send(b"body before head")


async def _expect_error(call: Callable[[], Awaitable[object]], reason: str,
                        woken: list[str] | None = None) -> None:
    with pytest.raises(StreamError) as caught:
        await call()
    assert caught.value.reason == reason
    if woken is not None:
        woken.append(reason)


async def _wait_failed_raising(stream: Stream) -> None:
    error = await stream.wait_failed()
    raise error



# ---- a head with the first body bytes (BODY) --------------------------------------------------


async def test_a_whole_small_response_is_one_message() -> None:
    async with mux_pair() as p:
        stream = await p.eecp.open_stream(GET, end=True)
        accepted, _ = await p.agent.accept_stream()
        await accepted.send_head(OK, body=b"x" * 100, end=True)
        assert accepted.finished
        assert await stream.receive_head() == OK
        assert await read_all(stream) == b"x" * 100
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_eecp.frames == [ResponseHeadFrame(1, OK, fin=True, data=b"x" * 100)]
        assert stream.finished and p.eecp.in_flight == 0 and p.agent.in_flight == 0


async def test_a_head_body_beyond_one_frame_goes_as_data_after_the_head() -> None:
    async with mux_pair(agent={"max_frame": 1024}) as p:
        stream = await p.eecp.open_stream(GET, end=True)
        accepted, _ = await p.agent.accept_stream()
        await accepted.send_head(OK, body=pattern(1, 2500), end=True)
        assert await stream.receive_head() == OK
        assert await read_all(stream) == pattern(1, 2500)
        await trio.testing.wait_all_tasks_blocked()
        assert p.to_eecp.frames[0] == ResponseHeadFrame(1, OK)
        assert [len(f.data) for f in p.to_eecp.frames[1:]] == [1024, 1024, 452]
        assert [f.fin for f in p.to_eecp.frames[1:]] == [False, False, True]


async def test_a_head_body_spends_credit_like_data() -> None:
    async with mux_pair() as p:  # eecp's window 256 KiB; the initial credit is 64 KiB
        stream = await p.eecp.open_stream(GET, end=True)
        accepted, _ = await p.agent.accept_stream()
        await accepted.send_head(OK, body=bytes(INITIAL_WINDOW))  # all the credit there is
        sent = trio.Event()

        async def one_more() -> None:
            await accepted.send(b"y", end=True)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # no credit left: it waits for eecp to read
            assert p.to_eecp.of(DataFrame) == []
            assert await stream.receive_head() == OK
            assert await read_all(stream) == bytes(INITIAL_WINDOW) + b"y"
        assert p.max_buffered["eecp"] <= INITIAL_WINDOW


async def test_a_request_head_may_carry_its_body() -> None:
    async with mux_pair() as p:
        head = RequestHead("POST", "/form", [("content-length", "7")])
        await p.agent.feed(encode_frame(RequestHeadFrame(9, head, fin=True, data=b"a=1&b=2")))
        accepted, got = await p.agent.accept_stream()
        assert (accepted.id, got) == (9, head)
        assert await read_all(accepted) == b"a=1&b=2"


async def test_cancel_on_failure_cancels_on_reset_and_on_tunnel_loss_only() -> None:
    async with mux_pair() as p:
        first = await p.eecp.open_stream(GET, end=True)
        await p.eecp.open_stream(GET, end=True)
        clean = await p.eecp.open_stream(GET, end=True)
        reset_one, _ = await p.agent.accept_stream()
        lost_one, _ = await p.agent.accept_stream()
        finished, _ = await p.agent.accept_stream()
        scopes = [trio.CancelScope() for _ in range(3)]
        for stream, scope in zip((reset_one, lost_one, finished), scopes, strict=True):
            stream.cancel_on_failure(scope)
        await finished.send_head(OK, end=True)
        await clean.receive_head()
        await first.reset("client_gone")  # eecp's client went away
        await trio.testing.wait_all_tasks_blocked()
        assert [s.cancel_called for s in scopes] == [True, False, False]
        p.agent.close()
        assert [s.cancel_called for s in scopes] == [True, True, False]  # finished: never
        late = trio.CancelScope()
        lost_one.cancel_on_failure(late)  # after the failure: cancelled at once
        assert late.cancel_called


async def test_feeding_a_batch_of_many_frames_lets_other_tasks_run() -> None:
    # a peer's 64 KiB BATCH of tiny frames (WINDOWs for streams that do not exist) must not
    # hold the loop for its tunnel until every frame is handled: others get their turn
    agent, sent = recording_agent_mux()
    window = encode_frame(WindowFrame(7, 1))
    count = 4 * FEED_BUDGET
    batch = encode_batch([window] * count)
    turns = 0

    async def other_tunnel() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_tunnel)
        await trio.lowlevel.checkpoint()  # (it starts)
        before = turns
        await agent.feed(batch)
        during = turns - before
        nursery.cancel_scope.cancel()
    assert during >= count // FEED_BUDGET - 1, during
    assert sent == []  # (frames for unknown streams are dropped)

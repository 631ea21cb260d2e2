"""Many HTTP exchanges over one tunnel: a stream multiplexer with per-stream flow control.

Longer than this codebase's ~500 lines on purpose: :class:`Mux` and :class:`Stream` are one
state machine. The mux routes each frame to its stream's state and writes what the streams
queue; a stream's every change (credit, END, RESET, release) is the mux's slot accounting,
write queue and id table. Each reaches into the other's privates on every frame; split in two
modules, the one machine would only be harder to read. What is not the machine lives outside:
the frame codec (:mod:`eecp.wire.frames`), the heads (:mod:`eecp.wire.httpmsg`), the wake-ups
(:mod:`eecp.core.trioutil`).

Both ends use :class:`Mux`: eecp opens streams (``opener=True``: one per proxied request), the
agent accepts them. Frames are :mod:`eecp.wire.frames`'; the tunnel's reader hands every binary
message to :meth:`Mux.feed`, and the mux writes through the ``send_message`` it was given
(the tunnel's send), one message at a time: frames that queue up while a message is being
written go out together in the next one, as a BATCH (so at many requests at once, the
WebSocket layers' cost per message is shared by many frames; a lone frame is never delayed).

Flow control, per stream and direction: a sender starts with
:data:`~eecp.wire.frames.INITIAL_WINDOW` (64 KiB) of credit; a receiver that grants a larger window
sends the difference as a WINDOW frame when it opens (or accepts) the stream, and hands credit
back as its consumer takes data (once half the window was consumed). So a receiver never holds
more than its window per stream (per tunnel: ``max_streams × window``), :meth:`feed` never
waits for a consumer, and a stream without credit stalls only itself: DATA frames are at most
``max_frame`` bytes and writers on different streams take turns frame by frame.

Lifecycle: a stream frees its slot (and its id may be reused, after 2³² - 1 others) once it is
finished both ways (END sent and END received) or reset by either side; on the opening side a
finished stream keeps it until its body is read (or dropped: :meth:`Stream.release`), so that
slow readers stay within ``max_streams × window``. :meth:`Stream.aclose` (the ``async with``
exit) resets a stream that is not finished and releases one that is: no slot is leaked.
A direction whose END arrived stays readable to its end even if the stream is then reset or
the tunnel closes: the body is complete (HTTP/2's rule for a RST_STREAM after END_STREAM).

"END" above is either an END frame or the FIN flag on a head or DATA frame, which means the
same and saves a message: a sender that knows the body ends with what it writes says so
(``open_stream(head, end=True)``, ``send_head(head, end=True)``, ``send(data, end=True)``);
one that learns it later calls :meth:`Stream.end`. Either way the end is committed before its
frame is written (see :meth:`Stream.end`).

Writes are shielded from cancellation: a frame is written whole, or not at all because the
tunnel is gone (:meth:`Mux.close` cancels writes in progress). A cancelled caller stops
between frames, never leaving half a message on the WebSocket.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import NoReturn

import trio

from eecp.core.errors import EecpError, ProtocolError
from eecp.core.trioutil import Signal
from eecp.wire import frames
from eecp.wire.frames import (
    INITIAL_WINDOW,
    MAX_DATA,
    DataFrame,
    EndFrame,
    Frame,
    RequestHeadFrame,
    ResetFrame,
    ResponseHeadFrame,
    WindowFrame,
)
from eecp.wire.httpmsg import RequestHead, ResponseHead
from eecp.wire.protocol import CLOSE_PROTOCOL_ERROR

__all__ = ["Mux", "Stream", "StreamError"]

log = logging.getLogger("eecp.streams")

#: the most credit a sender may hold on one stream; more is a peer's bug
MAX_CREDIT = 2**32 - 1
#: the most frames one BATCH takes (besides its MAX_BATCH bytes). Without a count cap, the
#: whole backlog of a busy tunnel crosses in one message, is handled in one go and comes back
#: in one: the two ends take turns, each idle while the other works (at 64 requests at once,
#: ~2,600 req/s with both processes under 70 % busy). Splitting the backlog lets the peer start
#: on its first part while this side still works: ~3,800 req/s, eecp's core saturated; 8 to 16
#: measured within a few percent (bench/RESULTS.md).
BATCH_FRAMES = 12
#: frames :meth:`Mux.feed` handles before it lets the other tasks run: a BATCH of tiny frames
#: (64 KiB of 9-byte WINDOWs is 7,000 of them) must not hold the loop for one tunnel, however
#: fast its peer sends (each tunnel gets its turn, every FEED_BUDGET frames)
FEED_BUDGET = 256


class StreamError(EecpError):
    """A stream cannot go on: ``tunnel_closed`` (or the reason given to :meth:`Mux.close`),
    ``stream_reset:<reason>`` (either side reset it; the peer's reason, or ours),
    ``flow_control_violation`` (the peer sent beyond its credit), ``invalid_head``
    (a head the peer would refuse; ``detail`` names the field)."""

    http_status = 502


class Mux:
    """One tunnel's streams. ``opener=True`` on eecp's side, ``False`` on the agent's."""

    def __init__(self, send_message: Callable[[bytes], Awaitable[None]], *, opener: bool,
                 max_streams: int = 100, initial_window: int = 256 * 1024,
                 max_frame: int = MAX_DATA, max_head_bytes: int = 64 * 1024,
                 skip_unknown: bool = False, batch_frames: int = BATCH_FRAMES) -> None:
        if max_streams < 1 or not 0 < max_frame <= MAX_DATA:
            raise ValueError("max_streams must be >= 1 and max_frame within 1..64 KiB")
        self._send_message = send_message
        self.opener = opener
        self.max_streams = max_streams
        # every peer may send INITIAL_WINDOW before hearing from us: a smaller window is moot
        self.window = max(initial_window, INITIAL_WINDOW)
        self.max_frame = max_frame
        self.max_head_bytes = max_head_bytes
        self.skip_unknown = skip_unknown
        self.batch_frames = max(1, batch_frames)
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        # accepted-to-be streams, in arrival order (dicts keep insertion order)
        self._pending: dict[int, tuple[Stream, RequestHead]] = {}
        self._slots = Signal()  # a slot freed (or the mux closed)
        self._arrived = Signal()  # a stream to accept arrived (or the mux closed)
        self._writes: set[trio.CancelScope] = set()
        self._closed: str | None = None
        # the outbox (see _write): frames queued in order; counts of frames queued and written
        self._outbox: list[bytes] = []  # (a list: an empty deque is 600 bytes per tunnel)
        self._queued = 0
        self._written = 0
        self._writing = False  # a task is writing (or has been handed the writing)
        # tasks waiting for their frame to be written: (its number, the task), oldest first
        self._parked: list[tuple[int, trio.lowlevel.Task]] = []

    @property
    def in_flight(self) -> int:
        """Streams holding a slot: open (not finished both ways nor reset), including ones not
        yet accepted, and, on the opening side, finished ones whose body is not all read yet
        (so that slow readers cannot hold more than ``max_streams`` windows per tunnel)."""
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Body bytes received on all streams and not yet consumed (≤ in_flight × window)."""
        return sum(stream.buffered for stream in self._streams.values())

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed is not None

    async def wait_idle(self) -> None:
        """Return once no stream holds a slot (see :attr:`in_flight`), or the mux is closed:
        an agent leaving a draining eecp waits here for its requests in flight."""
        while self._streams and self._closed is None:
            await self._slots.wait()

    # ---- opening and accepting --------------------------------------------------------------

    async def open_stream(self, head: RequestHead, *, end: bool = False,
                          limit: int | None = None) -> Stream:
        """Open a stream for ``head`` (eecp's side); waits while ``limit`` (by default
        ``max_streams``; never more) are open.

        ``end=True``: the request has no body, and its head says so (FIN): one message, no
        END to follow. The caller bounds the wait (``move_on_after``). Raises
        :class:`StreamError` (``invalid_head`` before waiting, the close reason once the
        tunnel is gone).
        """
        if not self.opener:
            raise RuntimeError("only the opening side opens streams")
        payload = self._check_head(head)
        limit = self.max_streams if limit is None else min(limit, self.max_streams)
        while True:
            self._raise_if_closed()
            if len(self._streams) < limit:
                break
            await self._slots.wait()
        stream = Stream(self, self._allocate_id())
        self._streams[stream.id] = stream
        if end:  # before the write, as in Stream.end: the answer may be fed before it returns
            stream._commit_end()
        try:
            await self._write(RequestHeadFrame(stream.id, head, end), payload)
        except BaseException:
            stream._fail(StreamError("tunnel_closed", "the request head was not sent"))
            raise
        return stream

    async def accept_stream(self) -> tuple[Stream, RequestHead]:
        """The next stream the peer opened (the agent's side), in the order they arrived."""
        if self.opener:
            raise RuntimeError("the opening side does not accept streams")
        while True:
            self._raise_if_closed()
            if self._pending:
                stream, head = self._pending.pop(next(iter(self._pending)))
                return stream, head
            await self._arrived.wait()

    def _allocate_id(self) -> int:
        # 1, 2, 3, … wrapping after 2**32 - 1, skipping ids still open
        while True:
            stream_id = self._next_id
            self._next_id = stream_id % frames.MAX_STREAM_ID + 1
            if stream_id not in self._streams:
                return stream_id

    def _check_head(self, head: RequestHead | ResponseHead) -> bytes:
        """The head's payload, or ``StreamError("invalid_head")`` for one the peer refuses."""
        try:
            return frames.check_head(head, max_head_bytes=self.max_head_bytes)
        except ProtocolError as exc:
            raise StreamError("invalid_head", f"{exc.reason}: {exc.detail}") from None

    # ---- the tunnel's side ------------------------------------------------------------------

    async def feed(self, data: bytes) -> None:
        """Route one binary message from the tunnel (a frame, or a BATCH of them) to its
        streams, frame by frame in order.

        Never waits for a consumer. Raises ``ProtocolError`` for a message that is not a valid
        frame or breaks the protocol's order (the caller ends the tunnel with its close code);
        with ``skip_unknown``, a frame of a type this side does not know is dropped instead
        (a newer peer's), with one warning per message however many it held. A peer that
        overruns one stream's window gets that stream reset (``flow_control_violation``).
        Frames for streams already finished are dropped: they were in flight when the stream
        ended. After :meth:`close`, everything is dropped.
        """
        skipped, first = 0, ""
        try:
            for count, encoded in enumerate(frames.split_message(data), 1):
                if count % FEED_BUDGET == 0:
                    await trio.lowlevel.checkpoint()  # this tunnel's turn is over for now
                if self._closed is not None:
                    return
                try:
                    frame = frames.decode_frame(encoded, max_head_bytes=self.max_head_bytes)
                except ProtocolError as exc:
                    if not (self.skip_unknown and exc.reason == "invalid_frame:unknown_type"):
                        raise
                    skipped, first = skipped + 1, first or exc.detail
                    continue
                await self._on_frame(frame)
        finally:
            if skipped:  # a 64 KiB batch holds thousands of frames: one line, not thousands
                log.warning("ignoring %d frame(s) of unknown type, the first: %s",
                            skipped, first)

    async def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, RequestHeadFrame):
            await self._on_request_head(frame)
            return
        if isinstance(frame, ResponseHeadFrame) and not self.opener:
            _unexpected("response_head", "only the accepting side sends a response head")
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.finished:  # (a finished one may still hold its slot)
            return
        violation = stream._on_frame(frame)
        if violation:
            await self._reset_from_feed(stream, "flow_control_violation", violation)

    async def _on_request_head(self, frame: RequestHeadFrame) -> None:
        if self.opener:
            _unexpected("request_head", "only the opening side sends a request head")
        if frame.stream_id in self._streams:
            _unexpected("request_head", f"stream {frame.stream_id} is open already")
        if len(self._streams) >= self.max_streams:
            # the opener should have waited: refuse this one stream, not the tunnel
            await self._write_quietly(ResetFrame(frame.stream_id, "too_many_streams"))
            return
        stream = Stream(self, frame.stream_id, request=frame.head)
        self._streams[stream.id] = stream
        self._pending[stream.id] = (stream, frame.head)
        violation = stream._on_frame(frame)
        self._arrived.fire()
        if violation:
            await self._reset_from_feed(stream, "flow_control_violation", violation)

    async def _reset_from_feed(self, stream: Stream, reason: str, detail: str) -> None:
        log.warning("stream %d: %s (%s)", stream.id, reason, detail)
        stream._fail(StreamError(reason, detail))
        # written from the reader: a rare, tiny frame, only when the peer misbehaved
        await self._write_quietly(ResetFrame(stream.id, reason))

    def close(self, reason: str = "tunnel_closed") -> None:
        """The tunnel is gone: every open stream's pending and future calls raise
        ``StreamError(reason)`` now (a direction whose END arrived stays readable), waiting
        openers and accepters wake up with it, and writes in progress are abandoned."""
        if self._closed is not None:
            return
        self._closed = reason
        for stream in list(self._streams.values()):
            stream._fail(StreamError(reason, "the tunnel is gone"))
        self._streams.clear()
        self._pending.clear()
        self._outbox.clear()
        for scope in self._writes:
            scope.cancel()
        parked, self._parked = self._parked, []
        for _, task in parked:  # they find the mux closed
            trio.lowlevel.reschedule(task)
        self._slots.fire()
        self._arrived.fire()

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise StreamError(self._closed, "the tunnel is gone")

    def _forget(self, stream: Stream) -> None:
        """Free ``stream``'s slot (finished or reset); its id may be used again."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self._slots.fire()
        pending = self._pending.get(stream.id)
        if pending is not None and pending[0] is stream:  # reset before it was accepted
            del self._pending[stream.id]

    # ---- writing ----------------------------------------------------------------------------

    async def _write(self, frame: Frame, head_payload: bytes | None = None) -> None:
        """Write one frame whole, in the order of calls: only :meth:`close` can interrupt it
        (half a WebSocket message would corrupt the tunnel for every stream), and a cancelled
        caller returns once its frame is out. ``head_payload``: a head frame's payload from
        :meth:`_check_head`, not to be encoded twice.

        Frames queue in an outbox. A caller that finds no write in progress becomes the writer:
        it writes what is queued (up to ``batch_frames`` frames and
        :data:`~eecp.wire.frames.MAX_BATCH` bytes: one BATCH message, or the frame alone) until its
        own frame is out, then hands the rest to the owner of the next frame. The others park
        until the write that carries theirs. So a lone frame goes out at once, frames that pile
        up while a write is in progress share the next messages, and nobody writes for others
        for long.
        """
        self._raise_if_closed()
        if head_payload is not None and isinstance(frame, RequestHeadFrame | ResponseHeadFrame):
            data = frames.encode_head_frame(frame, head_payload)
        else:
            data = frames.encode_frame(frame)
        self._outbox.append(data)
        self._queued += 1
        mine = self._queued
        if self._writing:
            await self._park(mine)
            if self._written >= mine:
                return
            self._raise_if_closed()  # woken by close(), else handed the writing
        await self._lead(mine)

    async def _park(self, mine: int) -> None:
        """Wait, uncancellably (a parked task costs no cancel scope), until frame ``mine`` is
        written, this task is to write it (:meth:`_lead` hands over), or the mux closes."""
        self._parked.append((mine, trio.lowlevel.current_task()))
        await trio.lowlevel.wait_task_rescheduled(_refuse_abort)

    async def _lead(self, mine: int) -> None:
        """Write batches until frame ``mine`` is out, shielded (close() cancels it); then hand
        the writing to the owner of the oldest frame still queued, who is parked."""
        self._writing = True
        with trio.CancelScope(shield=True) as scope:
            self._writes.add(scope)
            try:
                while self._written < mine:
                    self._raise_if_closed()
                    await self._flush()
            finally:
                self._writes.discard(scope)
                if self._closed is None and self._parked:
                    # every queued frame's owner is parked, the oldest frame's owner first
                    trio.lowlevel.reschedule(self._parked.pop(0)[1])  # (still _writing)
                else:
                    self._writing = False
        if scope.cancelled_caught:
            self._raise_if_closed()

    async def _flush(self) -> None:
        """Write the frames at the head of the outbox as one message (see :meth:`_write`)."""
        outbox = self._outbox
        count, size = 1, frames.batch_size(outbox[0])
        limit = min(len(outbox), self.batch_frames)
        while count < limit and size + frames.batch_size(outbox[count]) <= frames.MAX_BATCH:
            size += frames.batch_size(outbox[count])
            count += 1
        batch = outbox[:count]
        del outbox[:count]
        message = batch[0] if len(batch) == 1 else frames.encode_batch(batch)
        try:
            await self._send_message(message)
        except Exception as exc:  # the transport's own error type: the tunnel is unusable
            log.info("tunnel write failed: %r", exc)
            self.close("tunnel_closed")
            raise StreamError("tunnel_closed", f"write failed: {exc!r}") from exc
        except BaseException:
            # KeyboardInterrupt and the like (a Cancelled here came from close()): the batch
            # left the outbox and maybe half of it the socket, so the tunnel is unusable
            self.close("tunnel_closed")
            raise
        self._written += len(batch)
        parked = self._parked
        done = 0
        while done < len(parked) and parked[done][0] <= self._written:
            trio.lowlevel.reschedule(parked[done][1])
            done += 1
        del parked[:done]

    async def _write_quietly(self, frame: Frame) -> None:
        """Write a frame nobody waits on (a RESET): once the tunnel is gone it is moot."""
        with contextlib.suppress(StreamError):
            await self._write(frame)


class Stream:
    """One request/response exchange. Use it as ``async with stream:`` to always free it."""

    def __init__(self, mux: Mux, stream_id: int, *, request: RequestHead | None = None) -> None:
        self.id = stream_id
        self._mux = mux
        self._accepting = request is not None
        self._response: ResponseHead | None = None  # the opener's received head
        self._head_sent = not self._accepting  # the opener's head went with open_stream
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._unacked = 0  # consumed, not yet granted back
        self._topped_up = False  # the peer's credit was raised to our window (_top_up)
        self._recv_credit = INITIAL_WINDOW  # what the peer may still send
        self._send_credit = INITIAL_WINDOW  # what we may still send
        self._received_end = False
        self._sent_end = False
        self._error: StreamError | None = None
        self._changed = Signal()
        self._send_lock = trio.Lock()
        self._on_failure: list[trio.CancelScope] = []

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by :meth:`receive` (never more than the window)."""
        return self._buffered

    @property
    def ready(self) -> bool:
        """Whether :meth:`receive` would return at once (a chunk, the end, or the error)."""
        return bool(self._buffer) or self._received_end or self._error is not None

    @property
    def finished(self) -> bool:
        """Finished both ways, or reset, or the tunnel is gone: nothing more crosses the wire
        (on the opening side the slot stays taken until the body is read or released)."""
        return self._error is not None or (self._sent_end and self._received_end)

    # ---- heads ------------------------------------------------------------------------------

    async def send_head(self, head: ResponseHead, *, body: bytes = b"",
                        end: bool = False) -> None:
        """Send the response head (the accepting side; once, before any body).

        ``body``: the first body bytes, in the head's own message (BODY) when they fit in
        one frame and the credit at hand, else as DATA after it. ``end=True``: the body ends
        with them (FIN), as if :meth:`end` followed: a whole small response is one message.
        """
        if not self._accepting or self._head_sent:
            raise RuntimeError("send_head: only once, on the accepting side")
        payload = self._mux._check_head(head)
        inline = len(body) <= min(self._send_credit, self._mux.max_frame)
        async with self._send_lock:
            self._raise_if_failed()
            if inline:
                self._send_credit -= len(body)
                if end:  # committed before the write: see end()
                    self._commit_end()
                await self._mux._write(ResponseHeadFrame(self.id, head, end, body), payload)
            else:
                await self._mux._write(ResponseHeadFrame(self.id, head), payload)
            self._head_sent = True
        if not inline:
            await self.send(body, end=end)

    async def receive_head(self) -> ResponseHead:
        """The response head (the opening side), once it arrives."""
        if self._accepting:
            raise RuntimeError("receive_head: the accepting side sends the head")
        while self._response is None:
            self._raise_if_failed()
            await self._changed.wait()
        return self._response

    # ---- body -------------------------------------------------------------------------------

    async def send(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes: DATA frames of at most ``max_frame``, each when credit allows.

        ``end=True``: ``data`` is the end of the body; its last DATA frame says so (FIN), as
        if :meth:`end` followed (an empty ``data`` sends a plain END).
        """
        self._check_can_send()
        if end and not data:
            await self.end()
            return
        view = memoryview(data).cast("B")
        async with self._send_lock:
            if self._sent_end:  # a concurrent send(end=True) or end() got the lock first
                raise RuntimeError("the body was ended already")
            while view:
                # writes are not interrupted: a cancelled sender stops here, between frames
                await trio.lowlevel.checkpoint_if_cancelled()
                size = min(len(view), await self._credit(), self._mux.max_frame)
                self._send_credit -= size  # spent now: a concurrent WINDOW adds to the rest
                last = end and size == len(view)
                if last:  # committed before the write: see end()
                    self._commit_end()
                await self._mux._write(DataFrame(self.id, _piece(data, view, size), last))
                view = view[size:]

    async def _credit(self) -> int:
        while True:
            self._raise_if_failed()
            if self._send_credit > 0:
                return self._send_credit
            await self._changed.wait()

    async def end(self) -> None:
        """This direction's body is complete (END). Idempotent."""
        if self._sent_end:
            return
        self._check_can_send()
        async with self._send_lock:  # after any DATA still being written
            self._raise_if_failed()
            if self._sent_end:  # a concurrent end() or send(end=True) got the lock first
                return
            # Committed before the write: the peer frees this stream's slot when the END
            # arrives and may open the next stream at once; its head may reach us before our
            # write returns, and must not find the slot still taken (too_many_streams).
            # The same holds for a FIN, which send(), send_head() and open_stream() commit
            # the same way.
            self._commit_end()
            await self._mux._write(EndFrame(self.id))

    async def receive(self) -> bytes | None:
        """The next body chunk in arrival order; ``None`` after END.

        Raises :class:`StreamError` once the stream is reset or the tunnel closed (unless END
        arrived first: a complete body stays readable). Hands credit back to the peer once
        half the window was consumed.
        """
        while not self._buffer:
            if self._received_end:
                return None
            self._raise_if_failed()
            await self._changed.wait()
        chunk = self._buffer.popleft()
        self._buffered -= len(chunk)
        self._unacked += len(chunk)
        if self._received_end and not self._buffer:
            self._maybe_finished()  # the last unread bytes of a finished stream: its slot frees
        if not self._received_end:
            increment = self._top_up()
            if self._unacked >= self._mux.window // 2:
                increment, self._unacked = increment + self._unacked, 0
            if increment:
                # the tunnel may be gone: then the next call says so (this chunk did arrive)
                with contextlib.suppress(StreamError):
                    await self._grant(increment)
        return chunk

    # ---- ending -----------------------------------------------------------------------------

    async def reset(self, reason: str) -> None:
        """Abort the stream both ways with ``reason`` (cut to fit a RESET frame)."""
        if self.finished:
            return
        reason = frames.reset_reason(reason)
        self._fail(StreamError(f"stream_reset:{reason}", "reset by this side"))
        await self._mux._write_quietly(ResetFrame(self.id, reason))

    async def aclose(self) -> None:
        """Done with the stream: a stream not finished both ways is reset (``closed``); a
        finished one drops what it holds unread (:meth:`release`)."""
        if self.finished:
            self.release()
            return
        await self.reset("closed")

    def release(self) -> None:
        """Drop the unread body of a finished stream, freeing its slot (nothing to tell the
        peer). A no-op for an unfinished stream: that one needs :meth:`aclose`."""
        if self.finished:
            self._buffer.clear()
            self._buffered = 0
            self._mux._forget(self)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.finished:  # nothing to tell the peer: no scope to pay for
            self.release()
            return
        with trio.CancelScope(shield=True):  # a cancelled holder still tells the peer
            await self.aclose()

    async def wait_failed(self) -> StreamError:
        """Return once the stream is reset (by either side) or the tunnel closed; never for a
        stream that finishes cleanly. For cancelling work (a backend call) that the stream
        no longer needs."""
        while self._error is None:
            await self._changed.wait()
        return StreamError(self._error.reason, self._error.detail)

    def cancel_on_failure(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the stream is reset (by either side) or the tunnel closes
        (at once if that happened already): :meth:`wait_failed` without a task to run it,
        for the one request per stream that must stop when nobody awaits its answer."""
        if self._error is not None:
            scope.cancel()
        else:
            self._on_failure.append(scope)

    # ---- the mux's side ---------------------------------------------------------------------

    def _top_up(self) -> int:
        """Once per stream, the credit that raises the peer's from INITIAL_WINDOW to our window.

        Granted with the first chunk the consumer takes of a body still coming, not when the
        stream opens: most bodies (none at all, or a small one) end within the initial credit,
        and a WINDOW frame per stream and direction would cost more than they carry."""
        if self._topped_up:
            return 0
        self._topped_up = True
        return max(0, self._mux.window - INITIAL_WINDOW)

    async def _grant(self, increment: int) -> None:
        self._recv_credit += increment  # before the write: the peer may use it at once
        await self._mux._write(WindowFrame(self.id, increment))

    def _on_frame(self, frame: Frame) -> str | None:
        """Apply a frame from the peer; a flow-control violation is returned, not raised."""
        if isinstance(frame, RequestHeadFrame | ResponseHeadFrame):
            if isinstance(frame, ResponseHeadFrame):
                if self._response is not None:
                    _unexpected("response_head", f"a second head on stream {self.id}")
                self._response = frame.head
            # a head's BODY is a DATA frame right after it; its FIN an END after that
            violation = self._on_data(frame.data) if frame.data else None
            if violation:
                return violation
            if frame.fin:
                self._on_end()
        elif isinstance(frame, DataFrame):
            violation = self._on_data(frame.data)
            if violation:  # the stream is reset: the FIN is moot
                return violation
            if frame.fin:  # the last chunk: as an END right after it
                self._on_end()
        elif isinstance(frame, EndFrame):
            self._check_body_order("end")
            self._on_end()
        elif isinstance(frame, ResetFrame):
            self._fail(StreamError(f"stream_reset:{frame.reason}", "reset by the peer"))
        elif isinstance(frame, WindowFrame):
            if self._send_credit + frame.increment > MAX_CREDIT:
                return f"credit above {MAX_CREDIT}"
            self._send_credit += frame.increment
        self._changed.fire()
        return None

    def _on_data(self, data: bytes) -> str | None:
        self._check_body_order("data")
        if len(data) > self._recv_credit:
            return f"{len(data)} bytes with {self._recv_credit} of credit"
        self._recv_credit -= len(data)
        if data:
            self._buffer.append(data)
            self._buffered += len(data)
            self._changed.fire()
        return None

    def _on_end(self) -> None:
        """The peer's direction is complete (END, or FIN on its last frame)."""
        self._received_end = True
        self._maybe_finished()

    def _check_body_order(self, kind: str) -> None:
        if self._received_end:
            _unexpected(kind, f"{kind.upper()} after END on stream {self.id}")
        if not self._accepting and self._response is None:
            _unexpected(kind, f"{kind.upper()} before the head on stream {self.id}")

    def _fail(self, error: StreamError) -> None:
        """Reset or tunnel gone: wake every waiter with ``error``; free the slot."""
        if self._error is not None:
            return
        self._error = error
        if not self._received_end:  # an incomplete body is worthless: drop it
            self._buffer.clear()
            self._buffered = 0
        self._mux._forget(self)
        self._changed.fire()
        for scope in self._on_failure:
            scope.cancel()
        self._on_failure.clear()

    def _commit_end(self) -> None:
        """Count this side's END (or FIN) as sent, before its frame is written: see end()."""
        self._sent_end = True
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        # the opener keeps the slot of a finished stream while its body waits to be read: a
        # reader slower than the agent holds a window, and at most max_streams of them
        if self._sent_end and self._received_end and not (self._buffered and self._mux.opener):
            self._mux._forget(self)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # a fresh exception per raise: one instance raised in several tasks would collect
            # every task's traceback
            raise StreamError(self._error.reason, self._error.detail)

    def _check_can_send(self) -> None:
        self._raise_if_failed()
        if not self._head_sent:
            raise RuntimeError("send the response head before the body")
        if self._sent_end:
            raise RuntimeError("the body was ended already")


def _refuse_abort(_: object) -> trio.lowlevel.Abort:
    """A parked writer is not woken by cancellation: its frame is committed to the outbox, so it
    returns once that is written (a cancellation then shows at its next checkpoint)."""
    return trio.lowlevel.Abort.FAILED


def _unexpected(kind: str, detail: str) -> NoReturn:
    raise ProtocolError(f"unexpected_frame:{kind}", detail, CLOSE_PROTOCOL_ERROR)


def _piece(data: bytes, view: memoryview, size: int) -> bytes:
    """The next ``size`` bytes of ``view`` as bytes: ``data`` itself when that is all of it (a
    chunk that fits one frame, the usual case, is not copied; only immutable bytes can be
    queued uncopied), else a copy."""
    if size == len(data) and type(data) is bytes:
        return data
    return bytes(view[:size])

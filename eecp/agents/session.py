"""One agent's session: everything that happens while its tunnel is open.

The register message must arrive within the attest deadline. Then the session's own nursery
runs, as named tasks::

    session nursery
      ├─ reader          decodes every message; health and answers are routed from here
      ├─ attestation     challenge on register, then every EE_ATTEST_INTERVAL_SEC (± jitter),
      │                  and again when the agent re-registers to renew its TTL
      ├─ health          a deadline pushed forward by each health message; silence → fail
      └─ ttl             tells the agent when its registration enters its warning window

Whatever decides the agent can no longer be trusted (a refused or late attestation, a protocol
violation) calls :meth:`AgentSession.end`, which records the close code and cancels the
nursery: nothing outlives the session. The socket is closed in ``finally``.

An accepted attestation is a verdict about the TD, not yet about the agent: a register
attestation admits the agent only once the name claim, the agent_id's binding in the store and
the live sessions agree (:meth:`AgentSession._admit`). The audit row is written after that
decision, so it records what happened: ``accepted`` only for an agent admitted (its row
written), else the refusal that admission gave (``agent_id_in_use``, ``app_name_taken``, …).

With the ledger on (``deps.ledger``), an admitted session also reports what it lives through
as availability events (spec §8.2), each under this tunnel's random ``session_id`` and the PPID
of its latest accepted quote: ``up attested`` when it is admitted, ``up health_restored`` /
``down health_fail`` / ``down health_timeout`` as its health turns, ``down
attestation_refused:<reason>`` / ``down attestation_timeout`` when a later attestation ends it,
``release app_gone`` when its registration expires, and at its end ``down superseded``,
``down observer_shutdown`` (eecp is stopping, or draining: however the session then ends) or
``down disconnected:<ending reason>``. A session never admitted writes nothing: an anonymous
peer cannot make records against a node.
Each accepted attestation whose register named a ``node_id`` also leaves a platform claim, and
an audited refusal that is a fraud signal (spec §10.4) suspends the platform's node.

Why one module over 500 lines: a session is one state machine. Its tasks and its verdict
handling read and write the same few fields (``admitted``, ``_known``, ``agent``, ``register``,
the challenge's mailbox) under trio's single thread, and the order of those writes *is* the
protocol (a late answer, a re-register mid-challenge, a supersede). The pure parts already live
elsewhere: the protocol (:mod:`eecp.wire.protocol`), the admission decision
(:mod:`eecp.agents.admission`), the verdict (:mod:`eecp.attestation`), the ledger's side
(:mod:`eecp.agents.ledger_hooks`). Splitting the rest would hand the session's state around.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import trio

from eecp.agents import admission
from eecp.agents.deps import SessionDeps
from eecp.agents.ledger_hooks import SessionEvent, ppid_of
from eecp.agents.registration import check_claim, registration_state
from eecp.agents.registry import AgentView
from eecp.attestation.engine import Challenge, Outcome
from eecp.core.clock import Clock, isoformat
from eecp.core.errors import EecpError, ProtocolError, RegistrationError, StoreError
from eecp.core.ratelimit import SUMMARY_EVERY_SEC, RefusedAuditLimit
from eecp.ledger.observe import EventKind
from eecp.ledger.stake import FRAUD_SIGNALS
from eecp.store.records import AgentRecord, AuditEntry
from eecp.wire import protocol
from eecp.wire.protocol import AttestResponse, Health, ProxyResponse, Register, Status
from eecp.wire.seed import SeedTunnel
from eecp.wire.streams import Mux

log = logging.getLogger("eecp.session")

#: how long cleanup (closing the socket, persisting last_seen) may take once a session ends
CLEANUP_GRACE_SEC = 5.0
#: how long a refused agent gets to take the status that says why, before the close
REFUSE_SEND_SEC = 1.0


#: the attestation interval's jitter; one for all sessions (a Random is 2.5 KiB per tunnel)
_JITTER = random.Random()


class TunnelSocket(Protocol):
    """The WebSocket as a session sees it (:class:`eecp.agents.tunnels.AsgiSocket` in
    production)."""

    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer has closed or vanished."""
        ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


@dataclass
class Ending:
    """Why a session ended: the close code and the stable reason sent with it."""

    code: int
    reason: str


class AgentSession:
    """Runs one agent's tunnel from its first message to its close."""

    def __init__(self, deps: SessionDeps, socket: TunnelSocket, peer: str,
                 on_registered: Callable[[AgentSession], Awaitable[None]] | None = None,
                 rng: random.Random | None = None) -> None:
        self.deps = deps
        self.socket = socket
        self.peer = peer
        self.register: Register | None = None
        self.agent: AgentView | None = None
        self.ending: Ending | None = None
        self._on_registered = on_registered
        self._rng = rng or _JITTER
        self._send_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # one-slot mailboxes (a memory channel pair is 1.8 KiB per tunnel): the answer to the
        # challenge in flight (the event exists only while one is), and a renewal asked for
        self._answer: AttestResponse | None = None
        self._answered: trio.Event | None = None
        self._renewal: Register | None = None
        self._renewal_asked = trio.Event()
        self._health_scope: trio.CancelScope | None = None
        self._health_heard = trio.Event()
        self._renewed = trio.Event()
        self._ttl_started = False
        self._told_unknown = False
        #: the first attestation was accepted: the agent is in the registry and the store
        self.admitted = False
        #: the store knows this agent_id, bound to this session's app and repo
        self._known = False
        #: names this tunnel in the ledger's availability events
        self.session_id = secrets.token_hex(8)
        #: the session's final ``down`` was written where it ended (a refused attestation)
        self._final_down = False
        #: the node stopped expecting the agent (its registration expired)
        self._released = False
        #: eecp is draining: the agent was (or is about to be) told to move (see drain())
        self.draining = False
        config = deps.config
        #: request streams to the app over this tunnel (the forwarding scope of the session)
        self.mux = Mux(self.send, opener=True, max_streams=config.tunnel_max_streams,
                       initial_window=config.stream_window_bytes)
        #: instead, for an agent whose register announced no data_protocol: its requests as
        #: the seed's JSON messages (set at register)
        self.seed: SeedTunnel | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until the socket closes or the agent is no longer trusted."""
        try:
            with trio.CancelScope() as self._scope:
                register = await self._await_register()
                if register is not None:
                    await self._serve(register)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_GRACE_SEC):
                await self._cleanup()

    def end(self, code: int, reason: str) -> None:
        """End the session (first caller wins): record why and cancel everything it runs."""
        if self.ending is None:
            self.ending = Ending(code, reason)
        if self._scope is not None:
            self._scope.cancel()

    def drain(self) -> None:
        """eecp is stopping: tell the agent (``warning draining``) so that it moves once its
        requests in flight here end. However the session then ends, its last availability
        event is eecp's own doing (``down observer_shutdown``). A session not yet serving is
        told as soon as it is (:meth:`_serve`)."""
        if self.draining:
            return
        self.draining = True
        if self._nursery is not None and self.ending is None:  # (ending: its nursery closes)
            self._nursery.start_soon(self._tell_draining, name="drain")

    async def _tell_draining(self) -> None:
        await self.send_status("warning", protocol.DRAINING)

    async def _await_register(self) -> Register | None:
        deadline = self.deps.config.attest_deadline_sec
        with trio.move_on_after(deadline):
            while True:
                message = await self._receive()
                if message is None:
                    continue
                if isinstance(message, Register):
                    return message
                await self._refuse(ProtocolError("register_expected",
                                                 "the first message must be register",
                                                 protocol.CLOSE_PROTOCOL_ERROR))
                return None
        await self._refuse(ProtocolError("register_timeout", "no register within the deadline",
                                         protocol.CLOSE_REGISTER_TIMEOUT))
        return None

    async def _serve(self, register: Register) -> None:
        try:
            self._check_register(register)
        except RegistrationError as exc:
            await self._refuse(exc, protocol.CLOSE_REGISTRATION_REFUSED)
            return
        self.register = register
        now = self.deps.clock.now()
        known = await self.deps.store.get_agent(register.agent_id)
        if known is not None and (known.app_name, known.repo) != (register.app_name,
                                                                  register.repo):
            known = None  # bound to another app: admission will refuse it (agent_id_in_use)
        self._known = known is not None
        if register.data_protocol == protocol.SEED_PROTOCOL:
            self.seed = SeedTunnel(self.send, max_streams=self.deps.config.tunnel_max_streams,
                                   max_body=self.deps.config.tunnel_max_message_bytes)
        self.agent = AgentView(AgentRecord(
            agent_id=register.agent_id, app_name=register.app_name, repo=register.repo,
            release_tag=register.release_tag, network=register.network,
            first_seen=known.first_seen if known else now, last_seen=now), connected=True,
            mux=None if self.seed else self.mux, seed=self.seed)
        # Nothing of this session reaches the registry, the store or the live sessions before
        # its first attestation is accepted (_record_acceptance): an agent_id is no secret, and a
        # register alone must not supersede, hide or overwrite the attested agent holding it.
        log.info("agent %s connected from %s for app %s (%s@%s, %s)", register.agent_id,
                 self.peer, register.app_name, register.repo, register.release_tag,
                 register.network)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reader, name=f"reader:{register.agent_id}")
            nursery.start_soon(self._attestation_loop, register,
                               name=f"attestation:{register.agent_id}")
            nursery.start_soon(self._health_watchdog, name=f"health:{register.agent_id}")
            if self.draining:  # eecp began draining before this session served
                nursery.start_soon(self._tell_draining, name="drain")

    def _check_register(self, register: Register) -> None:
        # none announced: an agent written against the seed's protocol (JSON proxy messages)
        if register.data_protocol not in (protocol.DATA_PROTOCOL, protocol.SEED_PROTOCOL):
            raise RegistrationError(
                "data_protocol_unsupported", f"this eecp speaks data protocol "
                f"{protocol.DATA_PROTOCOL} (or none: the seed's JSON messages); the agent "
                f"announced {register.data_protocol}")
        if self.deps.registry.network(register.network) is None:
            raise RegistrationError("network_unknown",
                                    f"network {register.network!r} is not served here")
        check_claim(self.deps.registry.app(register.app_name), register,
                    self.deps.clock.now())

    async def _cleanup(self) -> None:
        self.mux.close("tunnel_closed")  # every request in flight on this tunnel ends now
        if self.seed is not None:
            self.seed.close("tunnel_closed")
        ending = self.ending or Ending(protocol.CLOSE_NORMAL, "closed")
        if not self._final_down:
            self._event("down", _down_reason(ending.reason, draining=self.draining))
        agent = self.agent
        if agent is not None and self.admitted:
            self.deps.registry.detach(agent)
            record = self.deps.registry.update_agent(agent,
                                                         last_seen=self.deps.clock.now())
            try:
                # at our epoch: after a newer admission of the agent, this changes nothing
                await self.deps.store.atomic(lambda tx: tx.write_agent(record))
            except EecpError as exc:
                log.warning("could not record last_seen of %s: %s", agent.agent_id, exc)
        try:
            await self.socket.close(ending.code, ending.reason)
        except Exception as exc:  # the peer may be gone already; nothing left to tell it
            log.debug("close failed: %r", exc)
        who = agent.agent_id if agent else self.peer
        log.info("session %s ended: %s (%d)", who, ending.reason, ending.code)

    # ---- messages -------------------------------------------------------------------------

    async def _receive(self, binary: Callable[[bytes], Awaitable[None]] | None = None
                       ) -> protocol.AgentMessage | None:
        """The next valid message; ``None`` after a non-fatal problem was reported (or a
        binary data frame was handed to ``binary``)."""
        data = await self.socket.receive()
        if data is None:  # the peer closed the tunnel, or it broke: the session is over
            self.end(protocol.CLOSE_NORMAL, "peer_closed")
            await trio.sleep_forever()  # end() cancelled our scope: this raises at once
        if isinstance(data, bytes) and binary is not None:
            await binary(data)
            return None
        max_bytes = self.deps.config.tunnel_max_message_bytes
        try:
            return protocol.decode_agent_message(
                data, max_bytes=max_bytes,
                # a body of up to max_bytes in base64, and the largest message the WebSocket
                # takes (eecp.service): see decode_agent_message
                max_response_bytes=2 * max_bytes if self.seed is not None else None)
        except ProtocolError as exc:
            if exc.reason == "unknown_type":
                # newer agents may speak messages we do not know yet: say so (once: answering
                # every one would let a peer that never reads pile up our writes) and carry on
                if not self._told_unknown:
                    self._told_unknown = True
                    await self.send_status("warning", exc.reason)
                return None
            await self._refuse(exc)
            return None

    async def _reader(self) -> None:
        while True:
            message = await self._receive(binary=self._on_binary)
            if isinstance(message, AttestResponse):
                await self._on_answer(message)
            elif isinstance(message, Health):
                await self._on_health(message)
            elif isinstance(message, Register):
                await self._on_register_again(message)
            elif isinstance(message, ProxyResponse):
                self._on_proxy_response(message)

    def _on_proxy_response(self, message: ProxyResponse) -> None:
        """A seed-protocol agent's answer: to its request in flight, else dropped and counted
        (late after a timeout, repeated, or made up: never an error worth a tunnel)."""
        if self.seed is None or not self.admitted or not self.seed.deliver(message):
            self.deps.metrics.unknown_responses.inc()
            log.debug("agent %s: a proxy_response for no request in flight",
                      self.agent.agent_id if self.agent else self.peer)

    async def _on_binary(self, data: bytes) -> None:
        """A data frame of a proxied request: the mux routes it to its stream. Until the agent
        is admitted (its first attestation accepted) no stream can exist and only the JSON
        control messages are accepted: anything else ends the session (a peer that has proved
        nothing must not keep a core busy feeding frames to an empty mux). An agent that
        announced no data_protocol speaks only JSON: a data frame from it is refused too."""
        if self.seed is not None:
            await self._refuse(ProtocolError(
                "binary_unexpected", "the register announced no data_protocol: JSON only",
                protocol.CLOSE_INVALID_PAYLOAD))
            return
        if not self.admitted:
            await self._refuse(ProtocolError(
                "binary_unexpected", "no data frames before the first accepted attestation",
                protocol.CLOSE_INVALID_PAYLOAD))
            return
        try:
            await self.mux.feed(data)
        except ProtocolError as exc:
            await self._refuse(exc)

    async def _on_answer(self, answer: AttestResponse) -> None:
        if self._answered is None or self._answer is not None:  # none asked, or answered
            await self.send_status("warning", "unexpected_message")
            return
        self._answer = answer
        self._answered.set()

    async def _on_register_again(self, register: Register) -> None:
        current = self.register
        assert current is not None
        if (register.agent_id, register.app_name, register.repo, register.data_protocol) != (
                current.agent_id, current.app_name, current.repo, current.data_protocol):
            await self._refuse(ProtocolError(
                "register_mismatch", "a tunnel serves one agent, app and repo",
                protocol.CLOSE_PROTOCOL_ERROR))
            return
        if self._renewal is None:  # else one is already waiting to be served
            self._renewal = register
            self._renewal_asked.set()

    async def send_status(self, state: str, reason: str, **extra: object) -> None:
        """Tell the agent about a decision."""
        await self.send(Status(state, reason, extra).encode())  # type: ignore[arg-type]

    async def send(self, data: str | bytes) -> None:
        """Send one message; concurrent senders take turns."""
        async with self._send_lock:
            await self.socket.send(data)

    async def _refuse(self, error: EecpError, code: int | None = None) -> None:
        close = code if code is not None else getattr(error, "close_code",
                                                      protocol.CLOSE_POLICY)
        log.info("refusing %s: %s", self.peer, error)
        # ended first: nothing else of the session runs on. Telling the agent why is a
        # courtesy bounded in time, so a peer that stopped reading cannot hold the session.
        self.end(close, error.reason)
        with trio.CancelScope(shield=True), trio.move_on_after(REFUSE_SEND_SEC):
            await self.send_status("invalid", error.reason)

    # ---- attestation ----------------------------------------------------------------------

    async def _attestation_loop(self, register: Register) -> None:
        trigger = "register"
        while True:
            if not await self._challenge(register, trigger):
                return
            if trigger == "register" and not self._ttl_started:
                self._ttl_started = True
                assert self._nursery is not None
                self._nursery.start_soon(self._ttl_watcher, name=f"ttl:{register.agent_id}")
            trigger = "periodic"
            with trio.move_on_after(self._next_interval()):
                await self._renewal_asked.wait()
            if self._renewal is not None:
                register, self._renewal = self._renewal, None
                self._renewal_asked = trio.Event()
                trigger = "register"

    def _next_interval(self) -> float:
        """The attestation interval less up to 10 % (at most 5 min), so agents that all
        connected at one restart spread out instead of attesting in the same second."""
        interval = self.deps.config.attest_interval_sec
        return interval - self._rng.uniform(0, min(0.1 * interval, 300.0))

    async def _challenge(self, register: Register, trigger: str) -> bool:
        """One challenge/answer/verdict round; False when the session must end."""
        deadline = self.deps.config.attest_deadline_sec
        nonce = secrets.token_bytes(32)
        # a fresh mailbox: an answer that arrived late for an earlier challenge was refused
        answered = self._answered = trio.Event()
        # the agent's time starts when the challenge leaves, not when our send returns
        with trio.move_on_after(deadline):
            await self.send(protocol.AttestRequest(nonce, max(1, math.ceil(deadline)),
                                                   trigger).encode())  # type: ignore[arg-type]
            await answered.wait()
        answer, self._answer, self._answered = self._answer, None, None
        if answer is None:
            await self._audit_timeout(register, trigger)
            await self._refuse(ProtocolError("attestation_timeout", "no answer in time",
                                             protocol.CLOSE_ATTESTATION_TIMEOUT))
            return False
        challenge = Challenge(repo=register.repo, release_tag=register.release_tag,
                              network=register.network, nonce=nonce, quote=answer.quote,
                              claimed_report_data=answer.report_data,
                              measurements=answer.measurements)
        try:
            outcome = await self.deps.engine.attest(challenge)
            self.deps.metrics.attestation_seconds.observe(outcome.duration_sec)
            entry = outcome.audit_entry(challenge=challenge, app_name=register.app_name,
                                        agent_id=register.agent_id, trigger=trigger)
            if not outcome.accepted:
                await self._record_refusal(entry)
                await self._refuse(ProtocolError(outcome.reason, outcome.verdict.detail,
                                                  protocol.CLOSE_ATTESTATION_REFUSED))
                return False
            return await self._record_acceptance(register, outcome, entry, trigger)
        except StoreError as exc:
            # nothing of the verdict was applied: the agent is told to try again later
            log.warning("store failed on a verdict for %s: %s", register.agent_id, exc)
            await self._refuse(ProtocolError("store_unavailable", exc.detail,
                                             protocol.CLOSE_TRY_AGAIN))
            return False

    def _count(self, entry: AuditEntry) -> None:
        self.deps.metrics.attestations.labels(entry.verdict, entry.reason).inc()

    async def _audit(self, entry: AuditEntry) -> int | None:
        """Count ``entry`` and append it to the audit log (its id), or leave it out when its
        budget (``EE_AUDIT_REFUSALS_PER_MIN``, see :meth:`_audit_budget`) is spent (None)."""
        deps = self.deps
        self._count(entry)
        key = self._audit_budget(entry)
        if key is not None:
            limit = deps.refused_audit
            what = f"{entry.reason} for app {entry.app_name} from {self.peer}"
            if not limit.allow(key, entry.at, what):  # serve_audit_summaries logs it
                deps.metrics.audit_suppressed.labels(entry.reason).inc()
                return None
        return await deps.store.append_audit(entry)

    def _audit_budget(self, entry: AuditEntry) -> str | None:
        """The share of the audit budget ``entry`` is written under; None: always written.

        Budgeted are the refusals of attempts never admitted that anyone can cause in bulk:
        those whose quote did not verify (any peer; by the app name it named), and every
        refusal of a verified quote (one genuine TD can name any public repo, tag, app name
        and agent id, as often as it likes: by its platform) unless the agent is a known one
        of this app and repo. Acceptances and every decision about an admitted or known agent
        are always recorded."""
        if entry.verdict == "accepted" or self.admitted or self._known:
            return None
        if entry.tcb_status is None:
            return entry.app_name
        # (app names are DNS labels: no ':'; a platform eecp could not name shares one key)
        return f"platform:{entry.platform_id or 'unknown'}"

    async def _audit_timeout(self, register: Register, trigger: str) -> None:
        await self._audit(AuditEntry(
            at=self.deps.clock.now(), app_name=register.app_name,
            agent_id=register.agent_id, repo=register.repo, release_tag=register.release_tag,
            network=register.network, trigger=trigger, verdict="refused",
            reason="attestation_timeout"))
        if self.agent is not None:
            self.agent.attested = False
        self._final_event("attestation_timeout")

    async def _record_refusal(self, entry: AuditEntry) -> None:
        """A refused attestation: audited, and for an admitted agent its row too, together."""
        agent = self.agent
        assert agent is not None
        agent.attested = False
        if not self.admitted:
            # never admitted: the agent's row is not ours to write
            await self._fraud_signal(entry, await self._audit(entry))
            return
        record = self.deps.registry.update_agent(
            agent, last_verdict="refused", last_reason=entry.reason, last_seen=entry.at)
        self._count(entry)
        audit_id = await self.deps.store.atomic(
            lambda tx: admission.record_verdict(tx, record, entry))
        self._final_event(f"attestation_refused:{entry.reason}")
        await self._fraud_signal(entry, audit_id)

    async def _fraud_signal(self, entry: AuditEntry, audit_id: int | None) -> None:
        """Tell the ledger of an audited refusal of a genuine platform's quote: a fraud signal
        suspends the platform's node (spec §10.4; the ledger judges the reason). A refusal left
        out of the audit log has no evidence to cite and suspends nothing."""
        ppid = ppid_of(entry.platform_id)
        if self.deps.ledger is not None and audit_id is not None and ppid is not None \
                and entry.reason in FRAUD_SIGNALS:
            await self.deps.ledger.fraud_signal(ppid, audit_id, entry.reason)

    async def _record_acceptance(self, register: Register, outcome: Outcome,
                                 entry: AuditEntry, trigger: str) -> bool:
        """An accepted attestation, applied in the store (one unit of work), then in memory;
        False when it ends the session (admission refused, or the session was superseded)."""
        agent = self.agent
        assert agent is not None
        now = outcome.at
        record = replace(
            agent.record, release_tag=register.release_tag, network=register.network,
            sealed=outcome.measurements.sealed if outcome.measurements else None,
            last_attested_at=now, last_verdict="accepted", last_reason="attested",
            last_seen=now)
        ppid = ppid_of(outcome.platform_id)
        if trigger == "register":
            return await self._admit(register, record, entry, now, ppid)
        self._count(entry)
        audit_id = await self.deps.store.atomic(
            lambda tx: admission.record_verdict(tx, record, entry))
        if audit_id is None:
            await self._superseded()
            return False
        agent.record = record
        agent.attested = True
        self._accepted_for_ledger(ppid, first=False, renewal=False)
        app = self.deps.registry.app(register.app_name)
        assert app is not None
        await self.send_status("ok", "attested", trigger=trigger,
                               expires_at=isoformat(app.expires_at))
        await self._claim(register, ppid, audit_id)
        return True

    async def _admit(self, register: Register, record: AgentRecord, entry: AuditEntry,
                     now: float, ppid: str | None) -> bool:
        """A register attestation that verified: the claim, the renewal, the binding and the
        audit row decided in the store; memory then follows what committed."""
        registry = self.deps.registry
        ttl = self.deps.config.registration_ttl_days * 86400
        result = await self.deps.store.atomic(
            lambda tx: admission.admit(tx, register, record, entry, now, ttl))
        if isinstance(result, admission.Refused):
            await self._audit(replace(entry, verdict="refused", reason=result.error.reason))
            if result.app is not None:
                registry.put_app(result.app)  # memory follows the database
            self._final_event(f"attestation_refused:{result.error.reason}")
            await self._refuse(result.error, protocol.CLOSE_REGISTRATION_REFUSED)
            return False
        self._count(entry)
        agent = self.agent
        assert agent is not None
        first = not self.admitted
        if first and self._on_registered is not None:
            await self._on_registered(self)  # supersedes a previous live session
        registry.put_app(result.app)
        agent.record = result.agent
        agent.attested = True
        self.admitted = True
        self._known = True
        if registry.apps[register.app_name].agents.get(agent.agent_id) is not agent:
            registry.attach(agent)
        self.register = register
        self._renewed.set()
        self._renewed = trio.Event()
        self._accepted_for_ledger(ppid, first=first, renewal=True)
        await self.send_status("ok", "attested", trigger="register",
                               expires_at=isoformat(result.app.expires_at))
        await self._claim(register, ppid, result.audit_id)
        return True

    # ---- the ledger (spec §7.1, §8.2; nothing of this runs with the ledger off) -----------

    def _accepted_for_ledger(self, ppid: str | None, *, first: bool, renewal: bool) -> None:
        """An accepted attestation of the admitted agent: its platform, and ``up`` when that
        is news to the node (admitted; on another platform; renewed after its registration
        expired)."""
        agent = self.agent
        assert agent is not None
        moved = ppid != agent.ppid
        agent.ppid = ppid
        if first or moved or (self._released and renewal):
            self._released = False
            self._event("up", "attested")

    async def _claim(self, register: Register, ppid: str | None, audit_id: int | None) -> None:
        """The claim of the platform for the node the register names (spec §7.1 step 1)."""
        ledger, agent = self.deps.ledger, self.agent
        if ledger is not None and agent is not None and ppid is not None \
                and register.node_id is not None:
            await ledger.claim_platform(ppid, register.node_id, agent.agent_id, audit_id)

    def _event(self, kind: EventKind, reason: str) -> None:
        """Hand one availability event of this admitted session to the ledger's outbox."""
        ledger, agent = self.deps.ledger, self.agent
        if ledger is None or agent is None or not self.admitted:
            return
        ledger.record(SessionEvent(self.deps.clock.now(), agent.agent_id, agent.record.app_name,
                                   self.session_id, kind, reason, agent.ppid))

    def _final_event(self, reason: str) -> None:
        """The ``down`` that ends this session (a refused or late attestation): its cleanup
        then writes no second one."""
        if self.admitted and not self._final_down:
            self._event("down", reason)
            self._final_down = True

    async def _superseded(self) -> None:
        """A newer admission of this agent (here or in another eecp process) holds its row."""
        log.info("agent %s was admitted again elsewhere: this session is superseded",
                 self.agent.agent_id if self.agent else self.peer)
        self.end(protocol.CLOSE_SUPERSEDED, "superseded")

    # ---- health ---------------------------------------------------------------------------

    async def _on_health(self, message: Health) -> None:
        agent = self.agent
        if agent is None:
            return
        before = agent.health
        agent.health, agent.health_at = message.status, self.deps.clock.now()
        if self._health_scope is not None:
            self._health_scope.deadline = (trio.current_time()
                                           + self.deps.config.health_timeout_sec)
        self._health_heard.set()
        if before == "fail" and message.status == "pass":
            self._event("up", "health_restored")
            await self.send_status("ok", "health_restored")
        elif before != "fail" and message.status == "fail":
            self._event("down", "health_fail")
            await self.send_status("warning", "health_fail")

    async def _health_watchdog(self) -> None:
        timeout = self.deps.config.health_timeout_sec
        while True:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                self._health_scope = scope
                await trio.sleep_forever()
            self._health_scope = None
            # a fresh event before anything awaits: a health message that arrives while the
            # warning below is being sent must still restart the watch
            heard = self._health_heard = trio.Event()
            if self.agent is not None and self.agent.health != "fail":
                self.agent.health = "fail"
                log.info("agent %s silent for %.0fs: health fail", self.agent.agent_id, timeout)
                self._event("down", "health_timeout")
                await self.send_status("warning", "health_timeout")
            await heard.wait()

    # ---- registration TTL -----------------------------------------------------------------

    async def _ttl_watcher(self) -> None:
        config = self.deps.config
        warn_sec = config.registration_warn_days * 86400
        while True:
            register = self.register
            assert register is not None
            app = self.deps.registry.app(register.app_name)
            assert app is not None
            now = self.deps.clock.now()
            state = registration_state(app.expires_at, now, warn_sec)
            renewed = self._renewed
            if state == "active":
                await _wait(renewed, app.expires_at - warn_sec - now)
            elif state == "warning":
                await self.send_status("warning", "ttl_warning",
                                       expires_at=isoformat(app.expires_at))
                await _wait(renewed, min(app.expires_at - now, 86400.0))
            else:
                if not self._released:  # not the node's doing: it stops expecting the agent
                    self._released = True
                    self._event("release", "app_gone")
                await self.send_status("invalid", "registration_expired",
                                       expires_at=isoformat(app.expires_at))
                await renewed.wait()


async def serve_audit_summaries(limit: RefusedAuditLimit, clock: Clock) -> None:
    """Sum up, once a minute, the audit rows ``limit`` left out (one warning line, however
    long the flood; its last minute too)."""
    while True:
        await trio.sleep(SUMMARY_EVERY_SEC)
        count = limit.due_summary(clock.now())
        if count:
            log.warning("audit log: %d refusals of attempts never admitted left out in the "
                        "last minute or more (EE_AUDIT_REFUSALS_PER_MIN=%d); latest %s",
                        count, limit.per_minute, limit.latest)


def _down_reason(ending: str, *, draining: bool = False) -> str:
    """The cause of the ``down`` a session's end writes (spec §8.2): eecp's own stop and a
    newer session of the agent are excused for a reconnect grace; the rest is the tunnel's.
    A session that ends while eecp drains (the agent leaving as asked, or eecp closing it)
    ends by eecp's stop."""
    if ending == "superseded":
        return "superseded"
    if ending == "server_shutdown" or draining:
        return "observer_shutdown"
    return f"disconnected:{ending}"


async def _wait(event: trio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set, whichever comes first."""
    with trio.move_on_after(max(seconds, 0.0)):
        await event.wait()

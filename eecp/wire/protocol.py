"""The tunnel's JSON control protocol, sans I/O: messages as frozen dataclasses, strict decoding.

Agent → eecp::

    {"type":"register","repo":"org/repo","release_tag":"v0.1.3","app_name":"myapp",
     "network":"forge-1","agent_id":"<uuid>","data_protocol":2,
     "node_id":"acme-fra-1"}  (node_id optional; extra fields are ignored)
    {"type":"attest_response","nonce":"<64 hex>","quote":"<base64>","report_data":"<128 hex>",
     "measurements":{...}}
    {"type":"health","status":"pass"|"fail"}
    {"type":"proxy_response","request_id":"<hex>","status":200,"headers":{...},"body_b64":"..."}
        (only from an agent that announced no data_protocol: the seed's JSON proxy messages,
        :mod:`eecp.wire.seed`)

eecp → agent::

    {"type":"attest_request","nonce":"<64 hex>","deadline_s":30,"reason":"register"|"periodic"}
    {"type":"status","state":"ok"|"invalid"|"warning","reason":"...", ...}

Every decoding failure is a :class:`~eecp.core.errors.ProtocolError` with a stable reason
(``message_too_large``, ``invalid_json``, ``not_an_object``, ``unknown_type``,
``invalid_field:<name>``) and the WebSocket close code a session ends with when it cannot go on.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from eecp.core.errors import ProtocolError

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_QUOTE_BYTES = 64 * 1024

# WebSocket close codes. 1xxx are RFC 6455's; 4xxx are eecp's own, stable, documented in README.
#: the tunnel data protocol (binary frames, docs/tunnel-data-protocol.md) this eecp speaks; an
#: agent announces its own in ``register`` and one that speaks another is refused there, not
#: left to fail on its first proxied request
DATA_PROTOCOL = 2
#: what a register without ``data_protocol`` means: an agent written against the seed's
#: protocol, served with the seed's JSON ``proxy_request``/``proxy_response`` messages
SEED_PROTOCOL = 0

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013  # the server could not decide now (its store failed): retry later
CLOSE_REGISTER_TIMEOUT = 4001
CLOSE_ATTESTATION_TIMEOUT = 4002
CLOSE_ATTESTATION_REFUSED = 4003
CLOSE_REGISTRATION_REFUSED = 4004
CLOSE_PROTOCOL_ERROR = 4005
CLOSE_SUPERSEDED = 4009
#: the status reason (state ``warning``) of a stopping eecp: the agent finishes the requests
#: in flight on this tunnel, then dials again at once, not counting it as a failure
DRAINING = "draining"

_REPO = re.compile(r"^[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}$")
_TAG = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NETWORK = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: a ledger node id (eecp.ledger.journal.parse_node_id's grammar, which sits above this layer)
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


@dataclass(frozen=True)
class Register:
    """An agent asks to serve ``app_name`` from ``repo`` at ``release_tag`` on ``network``."""

    repo: str
    release_tag: str
    app_name: str
    network: str
    agent_id: str
    data_protocol: int = DATA_PROTOCOL  # 0 when a register did not announce one
    #: the ledger node the TD says it runs on (spec §7.1): a claim its operator confirms,
    #: never a binding by itself; None when the register names none
    node_id: str | None = None


@dataclass(frozen=True)
class AttestResponse:
    """An agent's answer to a challenge (not yet judged)."""

    nonce: bytes
    quote: bytes
    report_data: bytes
    measurements: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Health:
    """An agent's health report, based on a probe of its backend."""

    status: Literal["pass", "fail"]


@dataclass(frozen=True)
class ProxyResponse:
    """A seed-protocol agent's answer to one ``proxy_request`` (headers as the agent sent them,
    not yet checked: a bad one fails that request only, see :mod:`eecp.dataplane.proxy`)."""

    request_id: str
    status: int
    headers: list[tuple[str, str]] = field(hash=False)
    body: bytes = field(hash=False)


AgentMessage = Register | AttestResponse | Health | ProxyResponse


@dataclass(frozen=True)
class AttestRequest:
    """eecp's challenge: quote ``sha256(measurement material) || nonce`` within ``deadline_s``."""

    nonce: bytes
    deadline_s: int
    reason: Literal["register", "periodic"]

    def encode(self) -> str:
        return json.dumps({"type": "attest_request", "nonce": self.nonce.hex(),
                           "deadline_s": self.deadline_s, "reason": self.reason})


@dataclass(frozen=True)
class Status:
    """eecp's word after each decision: ``state`` ok/invalid/warning with a stable ``reason``."""

    state: Literal["ok", "invalid", "warning"]
    reason: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def encode(self) -> str:
        return json.dumps({"type": "status", "state": self.state, "reason": self.reason,
                           **self.extra})


def decode_agent_message(data: str | bytes, *,
                         max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                         max_response_bytes: int | None = None) -> AgentMessage:
    """Decode and validate one text message from an agent, or raise ``ProtocolError``.

    ``max_response_bytes`` (a seed-protocol agent's session): a ``proxy_response`` may be that
    large, beyond ``max_bytes``: its body is limited to ``max_bytes`` once decoded, and base64
    makes the message a third larger. A larger body must fail its request (502
    ``response_too_large``), not the whole tunnel, so the message has to be read to learn
    which request it answers."""
    if isinstance(data, bytes):
        raise ProtocolError("binary_unexpected", "control messages are JSON text",
                            CLOSE_INVALID_PAYLOAD)
    too_large = ProtocolError("message_too_large", f"{len(data)} > {max_bytes} bytes",
                              CLOSE_TOO_BIG)
    if len(data) > max(max_bytes, max_response_bytes or 0):
        raise too_large
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "message is not JSON", CLOSE_INVALID_PAYLOAD) from None
    if not isinstance(doc, dict):
        raise ProtocolError("not_an_object", "message is not a JSON object",
                            CLOSE_INVALID_PAYLOAD)
    kind = doc.get("type")
    if len(data) > max_bytes and kind != "proxy_response":
        raise too_large
    if kind == "register":
        return _register(doc)
    if kind == "attest_response":
        return _attest_response(doc)
    if kind == "health":
        return _health(doc)
    if kind == "proxy_response" and max_response_bytes is not None:
        return _proxy_response(doc)
    raise ProtocolError("unknown_type", f"type {str(kind)[:40]!r} is not known",
                        CLOSE_PROTOCOL_ERROR)


def _register(doc: Mapping[str, Any]) -> Register:
    repo = _string(doc, "repo", 140)
    if not _REPO.match(repo) or ".." in repo:
        raise _invalid("repo", "expected owner/name")
    tag = _string(doc, "release_tag", 128)
    if not _TAG.match(tag) or tag.startswith(".") or ".." in tag:
        raise _invalid("release_tag", "expected a release tag such as v1.2.3")
    app = _string(doc, "app_name", 63).lower()
    if not _DNS_LABEL.match(app):
        raise _invalid("app_name", "expected a DNS label (a-z, 0-9, -; at most 63)")
    network = _string(doc, "network", 63)
    if not _NETWORK.match(network):
        raise _invalid("network", "expected a network name")
    agent_id = _string(doc, "agent_id", 36)
    try:
        canonical = str(uuid.UUID(agent_id))
    except ValueError:
        raise _invalid("agent_id", "expected a UUID") from None
    if canonical != agent_id.lower():
        raise _invalid("agent_id", "expected a UUID in its canonical 8-4-4-4-12 form")
    return Register(repo, tag, app, network, canonical, _data_protocol(doc), _node_id(doc))


def _node_id(doc: Mapping[str, Any]) -> str | None:
    """The node a register names; None when it names none (older agents)."""
    if doc.get("node_id") is None:
        return None
    node_id = _string(doc, "node_id", 63)
    if not _NODE_ID.match(node_id):
        raise _invalid("node_id", "expected a node id (a-z, 0-9, -; at most 63)")
    return node_id


def _data_protocol(doc: Mapping[str, Any]) -> int:
    """The data protocol a register announces; 0 when it announces none."""
    value = doc.get("data_protocol")
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**16:
        raise _invalid("data_protocol", "expected an integer 1..65535")
    return value


def _attest_response(doc: Mapping[str, Any]) -> AttestResponse:
    nonce = _hex(doc, "nonce", 32)
    report_data = _hex(doc, "report_data", 64)
    quote_b64 = _string(doc, "quote", MAX_QUOTE_BYTES * 4 // 3 + 4)
    if not _B64.match(quote_b64):
        raise _invalid("quote", "expected base64")
    try:
        quote = base64.b64decode(quote_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("quote", "expected base64") from None
    if not quote:
        raise _invalid("quote", "empty quote")
    measurements = doc.get("measurements")
    if not isinstance(measurements, dict):
        raise _invalid("measurements", "expected an object")
    return AttestResponse(nonce, quote, report_data, measurements)


def _health(doc: Mapping[str, Any]) -> Health:
    status = doc.get("status")
    if status == "pass":
        return Health("pass")
    if status == "fail":
        return Health("fail")
    raise _invalid("status", "expected pass or fail")


def _proxy_response(doc: Mapping[str, Any]) -> ProxyResponse:
    request_id = _string(doc, "request_id", 64)
    status = doc.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise _invalid("status", "expected an HTTP status 100..599")
    body_b64 = doc.get("body_b64") or ""
    if not isinstance(body_b64, str) or not _B64.match(body_b64):
        raise _invalid("body_b64", "expected base64")
    try:
        body = base64.b64decode(body_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("body_b64", "expected base64") from None
    return ProxyResponse(request_id, status, _header_pairs(doc.get("headers")), body)


def _header_pairs(value: object) -> list[tuple[str, str]]:
    """The seed's ``{"name": "value"}`` headers as pairs (a list value: one line each; a list
    of ``[name, value]`` pairs is taken too)."""
    if value is None:
        return []
    items = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise _invalid("headers", "expected an object of strings")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise _invalid("headers", "expected an object of strings")
        name, values = item
        for one in values if isinstance(values, list) else [values]:
            if not isinstance(one, str):
                raise _invalid("headers", "expected an object of strings")
            pairs.append((name, one))
    return pairs


def _string(doc: Mapping[str, Any], key: str, max_len: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise _invalid(key, "expected a non-empty string")
    if len(value) > max_len:
        raise _invalid(key, f"longer than {max_len} characters")
    return value


def _hex(doc: Mapping[str, Any], key: str, nbytes: int) -> bytes:
    value = _string(doc, key, nbytes * 2)
    if len(value) != nbytes * 2 or not _HEX.match(value):
        raise _invalid(key, f"expected {nbytes * 2} hex characters")
    return bytes.fromhex(value)


def _invalid(key: str, detail: str) -> ProtocolError:
    return ProtocolError(f"invalid_field:{key}", detail, CLOSE_PROTOCOL_ERROR)


def encode_register(message: Register, **extra: Any) -> str:
    """The wire form of a ``register`` (used by our agent and by tests)."""
    node = {"node_id": message.node_id} if message.node_id is not None else {}
    return json.dumps({"type": "register", "repo": message.repo,
                       "release_tag": message.release_tag, "app_name": message.app_name,
                       "network": message.network, "agent_id": message.agent_id,
                       "data_protocol": message.data_protocol, **node, **extra})


def encode_attest_response(message: AttestResponse) -> str:
    """The wire form of an ``attest_response``."""
    return json.dumps({"type": "attest_response", "nonce": message.nonce.hex(),
                       "quote": base64.b64encode(message.quote).decode(),
                       "report_data": message.report_data.hex(),
                       "measurements": dict(message.measurements)})


def encode_health(message: Health) -> str:
    """The wire form of a ``health`` report."""
    return json.dumps({"type": "health", "status": message.status})


def decode_server_message(data: str) -> AttestRequest | Status:
    """Decode what eecp sends (our agent's side); ``ProtocolError`` for anything else."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "message is not JSON", CLOSE_INVALID_PAYLOAD) from None
    if not isinstance(doc, dict):
        raise ProtocolError("not_an_object", "message is not a JSON object",
                            CLOSE_INVALID_PAYLOAD)
    if doc.get("type") == "attest_request":
        reason = doc.get("reason")
        deadline = doc.get("deadline_s")
        if reason not in ("register", "periodic"):
            raise _invalid("reason", "expected register or periodic")
        if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline <= 0:
            raise _invalid("deadline_s", "expected a positive integer")
        return AttestRequest(_hex(doc, "nonce", 32), deadline, reason)
    if doc.get("type") == "status":
        state = doc.get("state")
        if state not in ("ok", "invalid", "warning"):
            raise _invalid("state", "expected ok, invalid or warning")
        extra = {k: v for k, v in doc.items() if k not in ("type", "state", "reason")}
        return Status(state, str(doc.get("reason", "")), extra)
    raise ProtocolError("unknown_type", f"type {str(doc.get('type'))[:40]!r} is not known",
                        CLOSE_PROTOCOL_ERROR)

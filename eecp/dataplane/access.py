"""The access log: one line per proxied request, on both entry points, naming what served it.

An operator must be able to answer "which attested release, and which agent, served this
request". Each request through the proxy listener (``via=proxy``) and each
``POST /v1/proxy/{app}`` call (``via=api``) ends with one INFO line on the ``eecp.access``
logger (its own name, so a deployment can route or silence it apart from eecp's other lines)::

    via=proxy client=203.0.113.7 method=GET app=shop path=/api/items status=200 in=0 out=512
    ms=2.3 agent=3f6c…-9a1e release=v1.4.2 reason=-

(one line). ``-`` is a field with no value (``null`` in the JSON format, whose keys are
:data:`FIELDS`): no agent was chosen (a refusal), no reason (a request answered). ``client``
is the address as trusted (:func:`eecp.dataplane.forwarded.client_address`), ``path`` never
carries the query (it may carry tokens), and no header or body is ever logged. ``status`` is
the app's answer (``0``: none reached the client, e.g. it left first); ``reason`` is the
stable reason of a refusal or of a request that failed, also one that failed mid-body after its
head went out (then ``status`` is the head's). ``in``/``out`` are body bytes.

Cost: the data plane is the hot path. A line is one logger call with a constant format and
a constant ``extra`` (nothing is built per request beyond the argument tuple), and nothing at
all when the log is off (``EE_ACCESS_LOG=off``) or the logger does not take INFO. The byte
counts ride on :class:`Tally`, which the body counting of both entry points already passes
through (:func:`eecp.dataplane.proxy.counted`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from eecp.core.logs import FIELDS_ATTR

if TYPE_CHECKING:
    from eecp.agents.registry import AgentView

ACCESS = logging.getLogger("eecp.access")

#: the fields of a line, in order (the JSON format's keys)
FIELDS = ("via", "client", "method", "app", "path", "status", "bytes_in", "bytes_out", "ms",
          "agent", "release", "reason")
_TEXT = ("via=%s client=%s method=%s app=%s path=%s status=%d in=%d out=%d ms=%.1f agent=%s "
         "release=%s reason=%s")
#: one dict for every line (logging copies its items onto each record)
_EXTRA = {FIELDS_ATTR: FIELDS}
#: the longest value a line shows (a path may be some KiB long)
MAX_VALUE_CHARS = 1024

#: the headers that name the serving agent and its release, with EE_PROXY_EXPOSE_AGENT=true
AGENT_HEADER = "x-ee-agent"
RELEASE_HEADER = "x-ee-release"
_EXPOSED = (AGENT_HEADER, RELEASE_HEADER)


class Tally:
    """One request's body bytes each way and the agent chosen for it. :meth:`inc` counts
    a request body chunk here and on the entry point's metric (``counter``), so passing the
    tally to :func:`~eecp.dataplane.proxy.counted` instead of the metric counts both."""

    __slots__ = ("_counter", "agent", "bytes_in", "bytes_out")

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self.bytes_in = 0
        self.bytes_out = 0
        self.agent: AgentView | None = None

    def inc(self, amount: int) -> None:
        self.bytes_in += amount
        self._counter.inc(amount)


class AccessLog:
    """Writes the lines of one entry point (``via``), when ``enabled`` (``EE_ACCESS_LOG``)."""

    __slots__ = ("enabled", "via")

    def __init__(self, via: str, enabled: bool = True) -> None:
        self.via = via
        self.enabled = enabled

    def line(self, client: str, method: str, app: str, path: str, status: int, tally: Tally,
             started: float, reason: str = "") -> None:
        """The line of a request that began at ``started`` (``time.perf_counter()``)."""
        if not self.enabled or not ACCESS.isEnabledFor(logging.INFO):
            return
        agent = tally.agent
        # the record made and handled here, as Logger.info would, but without its search of
        # the stack for the caller (a fifth of a line's cost; it is always this line). The
        # method is a token (the HTTP parser's, the JSON call's check), an agent id a UUID
        # and a release tag a plain tag (the register message's checks): only what a client
        # names freely goes through _value.
        ACCESS.handle(ACCESS.makeRecord(
            ACCESS.name, logging.INFO, __file__, 0, _TEXT,
            (self.via, _value(client), method or "-", _value(app), _value(path), status,
             tally.bytes_in, tally.bytes_out, round((time.perf_counter() - started) * 1000, 1),
             "-" if agent is None else agent.record.agent_id,
             "-" if agent is None else agent.record.release_tag, reason or "-"),
            None, "line", _EXTRA))


def agent_headers(headers: list[tuple[str, str]], agent: AgentView) -> list[tuple[str, str]]:
    """``headers`` (a response's) naming ``agent`` and its release; the app's own headers of
    those names are dropped, so what the client reads is eecp's word only."""
    kept = [(n, v) for n, v in headers if n.lower() not in _EXPOSED]
    kept.append((AGENT_HEADER, agent.record.agent_id))
    kept.append((RELEASE_HEADER, agent.record.release_tag))
    return kept


def _value(text: str) -> str:
    """``text`` as one field of a text line: ``-`` when empty, cut to
    :data:`MAX_VALUE_CHARS`, and escaped when it holds a space or a control character (a
    hostile Host or forwarded address must not forge fields or lines)."""
    if not text:
        return "-"
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "..."
    if " " in text or not text.isprintable():
        return text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
    return text

"""What ``POST /v1/proxy/{app}`` holds in memory, and a bound on it.

A JSON answer carries the app's whole body, so the call must hold all of it before it can
answer (and until the answer has left: the status may still turn into a 502 on the body's last
chunk). The proxy listener streams instead and holds next to nothing. Two decisions keep the
JSON proxy from turning one small request into many copies of a large answer:

* **One copy.** The answer is written into one ``bytearray`` as the body arrives: the JSON
  up to ``"body_b64":"`` (the head is known before the body), then each chunk's base64, then
  ``"}``. Base64 works on 3-byte groups, so a chunk's last one or two bytes wait for the next
  chunk (:class:`JsonAnswer`); the result is exactly what ``b64encode`` of the whole body
  gives. No list of chunks, no joined copy, no ``str`` and no ``json.dumps`` of a huge string:
  the answer takes 4/3 of the body (plus ``bytearray``'s growth slack of 1/8), where the seed's
  held about five bodies' worth at its peak.
* **A process-wide budget** (:class:`Budget`, ``EE_PROXY_JSON_BUFFER_BYTES``) of bytes all JSON
  calls buffer at once: a call takes its share as it buffers (its request as its bytes arrive,
  then its answer) and gives it back when the answer has been sent or dropped. A call that
  cannot have its next bytes fails with 503 ``proxy_busy`` and releases its stream, instead of
  the process growing until the kernel kills it. One client (address; IPv6 by /64) holds at
  most :data:`CLIENT_SHARE` of the budget at once, so a few callers that stop reading their
  answers cannot spend it for everyone. Single-threaded (trio): plain counters, no lock.
"""

from __future__ import annotations

import binascii
import json

from eecp.dataplane.proxy import ProxyError

#: the answer's last bytes: the end of the base64 string and of the object
_SUFFIX = b'"}'


#: the part of the budget one client may hold at once
CLIENT_SHARE = 0.5


class Budget:
    """Bytes the JSON proxy may buffer at once, across every call in the process."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._per_client = max(1, int(total * CLIENT_SHARE))
        self._clients: dict[str, int] = {}  # client -> bytes its calls hold

    def share(self, client: str = "") -> Share:
        """A new call's share for ``client`` (see :func:`eecp.dataplane.proxy.client_key`),
        empty until it takes some."""
        return Share(self, client)

    def _take(self, client: str, size: int) -> None:
        if self.used + size > self.total:
            raise ProxyError(503, "proxy_busy", f"JSON proxy calls buffer {self.used} of "
                             f"EE_PROXY_JSON_BUFFER_BYTES={self.total} bytes")
        held = self._clients.get(client, 0)
        if held + size > self._per_client:
            raise ProxyError(503, "proxy_busy", f"this client's calls buffer {held} bytes, "
                             f"{CLIENT_SHARE:.0%} of EE_PROXY_JSON_BUFFER_BYTES at most")
        self.used += size
        self._clients[client] = held + size

    def _give_back(self, client: str, size: int) -> None:
        self.used -= size
        left = self._clients.get(client, 0) - size
        if left > 0:
            self._clients[client] = left
        else:
            self._clients.pop(client, None)


class Share:
    """One call's part of a :class:`Budget`; :meth:`release` gives it all back (once)."""

    def __init__(self, budget: Budget, client: str = "") -> None:
        self._budget = budget
        self._client = client
        self.held = 0

    def take(self, size: int) -> None:
        """``size`` more bytes, or ``ProxyError(503, "proxy_busy")`` if the budget (or this
        client's part of it) has not got them (then nothing is taken)."""
        self._budget._take(self._client, size)
        self.held += size

    def release(self) -> None:
        self._budget._give_back(self._client, self.held)
        self.held = 0


class JsonAnswer:
    """``{"status","headers","body_b64"}`` built in one buffer as the body arrives; every
    byte it adds is taken from ``share`` first."""

    def __init__(self, status: int, headers: list[tuple[str, str]], share: Share,
                 limit: int) -> None:
        prefix = b'{"status":%d,"headers":%b,"body_b64":"' % (
            status, json.dumps([list(h) for h in headers], separators=(",", ":")).encode())
        share.take(len(prefix) + 4 + len(_SUFFIX))  # 4: the padded last group
        self.buffer = bytearray(prefix)
        self.status = status
        self.size = 0  #: body bytes so far
        self._share = share
        self._limit = limit
        self._carry = b""  # the last 1-2 bytes of a chunk, waiting to complete a 3-byte group

    def feed(self, chunk: bytes) -> None:
        """Append ``chunk``'s base64; ``ProxyError(502, "response_too_large")`` past the
        limit, ``ProxyError(503, "proxy_busy")`` when the budget is spent."""
        self.size += len(chunk)
        if self.size > self._limit:
            raise ProxyError(502, "response_too_large", f"over {self._limit} bytes")
        view = memoryview(chunk)
        if self._carry:
            need = 3 - len(self._carry)
            group, view = self._carry + view[:need], view[need:]
            if len(group) < 3:
                self._carry = group
                return
            self._append(group)
        whole = len(view) - len(view) % 3
        self._append(view[:whole])
        self._carry = bytes(view[whole:])

    def finish(self) -> bytearray:
        """The complete answer (the carried bytes padded, the JSON closed)."""
        self._append(self._carry)
        self._carry = b""
        self.buffer += _SUFFIX
        return self.buffer

    def _append(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if len(data) % 3 == 0:  # the padded last group came with the prefix's share
            self._share.take(len(data) // 3 * 4)
        self.buffer += binascii.b2a_base64(data, newline=False)

"""``GET /v1/resolve[/{app}]``: may this app be served? Built for nginx ``auth_request`` and Caddy
``forward_auth``, answered from memory (no database round trip).

200 when the app may be served; 403 otherwise — unknown apps included, because ``auth_request``
turns any status other than 2xx/401/403 into a 500 for the end user. The decision also travels
as headers a proxy can pass on (``X-EE-Allowed``, ``X-EE-Reason``, ``X-EE-Registration-State``,
``X-EE-Release-Tag``). HTTP-framework-free, so the control app and the data-plane auth listener
answer byte for byte alike.

``GET /v1/resolve`` takes the app from the first of ``X-Original-Host``, ``X-Forwarded-Host``,
``Host`` present, which must name one host. Repeated lines of a header are one list (RFC 9110
5.3), so two lines and a comma list are alike, and refused alike (403 ``ambiguous_host``):
believing the first, as one server would, or the last, as another, lets a client have the
decision made for one app and the request served by another. The proxy listener reads the
host it routes by with the same :func:`eecp.wire.httpmsg.host_label` (400 ``ambiguous_host``
there).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from eecp.agents.registry import Decision, Registry
from eecp.wire.httpmsg import AmbiguousHost, host_label

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
HOST_HEADERS = ("x-original-host", "x-forwarded-host", "host")
_HOST_NAMES = frozenset(HOST_HEADERS)


@dataclass(frozen=True)
class ResolveAnswer:
    """An HTTP answer: status, headers, JSON body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def app_from_host(headers: Iterable[tuple[str, str]]) -> str | None:
    """The app named by the first DNS label of X-Original-Host, X-Forwarded-Host or Host, the
    first of them present (``headers``: the request's, names in lower case, repeats kept);
    :class:`AmbiguousHost` when that header names more than one host."""
    found: dict[str, str] = {}
    for name, value in headers:
        if name in _HOST_NAMES:  # repeated lines are one list, as if joined (RFC 9110 5.3)
            found[name] = f"{found[name]}, {value}" if name in found else value
    for header in HOST_HEADERS:
        named = found.get(header)
        if named:
            return host_label(named, header)
    return None


def resolve_by_host(registry: Registry, headers: Iterable[tuple[str, str]],
                    now: float) -> ResolveAnswer:
    """``GET /v1/resolve``: the answer for the app the request's host names (an ambiguous
    host: 403 ``ambiguous_host``, resolve's refusal, which ``auth_request`` passes on as a
    refusal where a 400 would be its 500)."""
    try:
        app = app_from_host(headers)
    except AmbiguousHost:
        return _AMBIGUOUS_HOST
    return resolve(registry, app, now)


#: app name -> (decision, its answer): rendered once per decision the registry remembers
_ANSWERS: dict[str, tuple[Decision, ResolveAnswer]] = {}
_ANSWERS_MAX = 65536


def resolve(registry: Registry, app: str | None, now: float) -> ResolveAnswer:
    """The answer for ``app`` (None or a malformed name: refused like an unknown app)."""
    name = (app or "").lower()
    if not _DNS_LABEL.match(name):
        return answer_for(Decision(False, "unknown_app", name, {
            "allowed": False, "reason": "unknown_app", "app": name}))
    decision = registry.resolve(name, now)
    cached = _ANSWERS.get(name)
    if cached is not None and cached[0] is decision:
        return cached[1]
    answer = answer_for(decision)
    if decision.reason != "unknown_app":  # unregistered names are not remembered: unbounded
        if len(_ANSWERS) >= _ANSWERS_MAX:
            _ANSWERS.clear()
        _ANSWERS[name] = (decision, answer)
    return answer


def answer_for(decision: Decision) -> ResolveAnswer:
    """Render a decision as status, headers and body."""
    headers = (
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
        ("x-ee-allowed", "true" if decision.allowed else "false"),
        ("x-ee-reason", decision.reason),
        ("x-ee-registration-state", decision.registration_state),
        ("x-ee-release-tag", decision.release_tag),
    )
    return ResolveAnswer(200 if decision.allowed else 403, headers, decision.json)


_AMBIGUOUS_HOST = answer_for(Decision(False, "ambiguous_host", "", {
    "allowed": False, "reason": "ambiguous_host"}))

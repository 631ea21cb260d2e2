"""``GET /v1/resolve[/{app}]``: may this app be served? Built for nginx ``auth_request`` and Caddy
``forward_auth``, answered from memory (no database round trip).

200 when the app may be served; 403 otherwise — unknown apps included, because ``auth_request``
turns any status other than 2xx/401/403 into a 500 for the end user. The decision also travels
as headers a proxy can pass on (``X-EE-Allowed``, ``X-EE-Reason``, ``X-EE-Registration-State``,
``X-EE-Release-Tag``). HTTP-framework-free, so the control app and the data-plane auth listener
answer byte for byte alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from eecp.registry import Decision, Registry

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
HOST_HEADERS = ("x-original-host", "x-forwarded-host", "host")


@dataclass(frozen=True)
class ResolveAnswer:
    """An HTTP answer: status, headers, JSON body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def app_from_host(headers: Mapping[str, str]) -> str | None:
    """The app named by the first DNS label of X-Original-Host, X-Forwarded-Host or Host
    (``headers`` keyed in lower case)."""
    for name in HOST_HEADERS:
        value = headers.get(name)
        if value:
            return host_label(value)
    return None


def host_label(value: str) -> str:
    """The first DNS label of a Host-like header's value (its first entry, port dropped)."""
    host = value.split(",")[0].strip().lower()
    host = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    return host.split(".", 1)[0]


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

"""Bearer tokens on the control port: one guard, by role, for every protected route.

A role is who may call: ``admin`` (``EE_ADMIN_TOKEN``), ``launcher`` (``EE_LAUNCHER_TOKEN``),
``uptime`` (``EE_UPTIME_TOKEN``). A route is protected by its blueprint: :meth:`Guard.protect`
installs the check as the blueprint's ``before_request`` hook, so every route the blueprint
holds (today's admin views, tomorrow the ledger's) is checked before its view runs, and a route
added there cannot forget it. The rules:

* The admin's token is admitted wherever any role is: the admin may call everything.
* A blueprint names the roles it admits besides; a role whose token is unset admits no one
  (its routes take the admin's token only).
* When no token the blueprint admits is set, it is open: the admin views as the seed has them
  (``EE_ADMIN_TOKEN`` unset, start-up warns). With the ledger on the guard **fails closed**
  (``fail_closed``): a route none of whose tokens is set admits no one. The config already
  requires the admin's token then (spec §5), so this is the second lock, not the only one.

The ledger's routes (:mod:`eecp.control.ledger_api`) ask the guard who a request is
(:meth:`Guard.presented`): a role, a node's token to look up (``eecpn_…``: issued by the
ledger, stored only as its SHA-256, so it is the ledger that says whose it is), or a refusal,
``token_required`` (no ``Authorization`` at all) or ``token_invalid`` (anything else that names
no one).

A request presents its token as exactly one ``Authorization: Bearer <token>`` header (the
scheme in any case, RFC 9110 11.1). None, another scheme, an empty token or two
``Authorization`` headers (a field that must not repeat: which one would count is each
parser's guess) are refused alike, 401 with ``WWW-Authenticate: Bearer``. Tokens are compared
in constant time, every candidate, so the answer's timing says neither how much of a token
matched nor which role's it was.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from quart import Blueprint, jsonify, request

from eecp.core.config import Config
from eecp.ledger.nodes import TOKEN_PREFIX as NODE_TOKEN_PREFIX


class Role(enum.StrEnum):
    """Who may call a protected route."""

    ADMIN = "admin"
    LAUNCHER = "launcher"
    UPTIME = "uptime"


@dataclass(frozen=True)
class Tokens:
    """Each role's bearer token (None: unset). Never in a repr: logs must not print them."""

    admin: str | None = field(default=None, repr=False)
    launcher: str | None = field(default=None, repr=False)
    uptime: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Config) -> Tokens:
        return cls(config.admin_token, config.launcher_token, config.uptime_token)

    def of(self, role: Role) -> str | None:
        token: str | None = getattr(self, role.value)
        return token or None


def bearer(authorization: Sequence[str]) -> str | None:
    """The token of a request's ``Authorization`` header values; None unless there is exactly
    one, of the Bearer scheme, with a token."""
    if len(authorization) != 1:
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def matches(presented: str | None, expected: Iterable[str]) -> bool:
    """Whether ``presented`` is one of ``expected``, in constant time (each one compared)."""
    given = (presented or "").encode()
    hits = [hmac.compare_digest(given, token.encode()) for token in expected]
    return presented is not None and any(hits)


Refusal = Literal["token_required", "token_invalid"]


@dataclass(frozen=True)
class Presented:
    """Who a request's ``Authorization`` says it is: a ``role`` whose token it carries, a
    ``node_token`` for the ledger to look up, or why it names no one (``refusal``)."""

    role: Role | None = None
    node_token: str | None = field(default=None, repr=False)
    refusal: Refusal | None = None


class Guard:
    """The one bearer-token check of the control port's protected routes."""

    def __init__(self, tokens: Tokens, *, fail_closed: bool = False) -> None:
        self.tokens = tokens
        self.fail_closed = fail_closed

    def presented(self, authorization: Sequence[str]) -> Presented:
        """Who a request with these ``Authorization`` values is (see the module docstring).
        Every configured role token is compared, in constant time."""
        if not authorization:
            return Presented(refusal="token_required")
        token = bearer(authorization)
        if token is None:
            return Presented(refusal="token_invalid")
        given = token.encode()
        hits = [(role, hmac.compare_digest(given, expected.encode())) for role in Role
                if (expected := self.tokens.of(role)) is not None]
        for role, hit in hits:
            if hit:
                return Presented(role=role)
        if token.startswith(NODE_TOKEN_PREFIX):  # the ledger's to look up
            return Presented(node_token=token)
        return Presented(refusal="token_invalid")

    def accepted(self, roles: Iterable[Role]) -> list[str]:
        """The tokens a route admitting ``roles`` accepts (the admin's always)."""
        wanted = {Role.ADMIN, *roles}
        return [token for role in Role if role in wanted
                and (token := self.tokens.of(role)) is not None]

    def admits(self, authorization: Sequence[str], roles: Iterable[Role]) -> bool:
        """Whether a request with these ``Authorization`` values may call a route admitting
        ``roles`` (open when none of their tokens is set)."""
        return self.admits_token(bearer(authorization), roles)

    def admits_token(self, token: str | None, roles: Iterable[Role] = ()) -> bool:
        """Whether ``token`` (None: none presented) may call a route admitting ``roles``: the
        check of :meth:`admits` on a token that came another way (the dashboard's login form)."""
        accepted = self.accepted(roles)
        if not accepted:
            return not self.fail_closed
        return matches(token, accepted)

    def is_open(self, roles: Iterable[Role] = ()) -> bool:
        """Whether a route admitting ``roles`` admits anyone (none of their tokens is set)."""
        return not self.accepted(roles) and not self.fail_closed

    def protect(self, blueprint: Blueprint, *roles: Role) -> Blueprint:
        """Check every request to ``blueprint``'s routes before its view runs: 401
        ``<role>_token_required`` (the first role named, else ``admin``) when the request
        may not call them."""
        reason = f"{(roles[0] if roles else Role.ADMIN).value}_token_required"

        async def check() -> tuple[Any, int] | None:
            if self.admits(request.headers.getlist("Authorization"), roles):
                return None
            return unauthorized({"error": "unauthorized", "reason": reason})

        blueprint.before_request(check)
        return blueprint


def unauthorized(doc: dict[str, Any]) -> tuple[Any, int]:
    """401 with ``doc`` as its JSON body and the Bearer challenge."""
    response = jsonify(doc)
    response.headers["WWW-Authenticate"] = 'Bearer realm="eecp"'
    return response, 401

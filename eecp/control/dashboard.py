"""The admin dashboard: a read-only web UI on the control port, ``GET /admin``.

* ``GET /admin``: every app (state, release, network, registration expiry, attestation);
* ``GET /admin/apps/{app}``: one app's agents (connected, attested when, TCB status, last
  refusal reason, node, PPID) and its audit log;
* ``GET /admin/ledger`` (the ledger on): nodes (status, stake, payout balance), the platform's
  accounts, one period's settlements (``?period=``, by default the latest that may be settled);
* ``GET /admin/login``, ``POST /admin/login``: the form; the admin token in, a cookie out;
  ``POST /admin/logout`` ends the session.

What it shows is what the admin JSON views say: the pages are built from the same documents
(:func:`eecp.control.admin.list_apps`, :func:`eecp.control.admin.app_view`) and the ledger
service's own read calls, never a second copy of their logic.

Design decisions:

* **Server-rendered, autoescaped.** Every string shown came from an agent or a client (a
  node's status reason, a settlement note, an audit entry); the seed's dashboard had stored XSS
  through ``innerHTML``. Jinja2 renders every value escaped (``autoescape=True`` for every
  template, not by file extension) and no template marks anything safe. The pages carry no
  script at all; they refresh themselves with ``<meta http-equiv="refresh">``.
* **A strict Content-Security-Policy** (:data:`SECURITY_HEADERS`): nothing but the same-origin
  stylesheet and images may load, no inline script or style runs, forms post only here, no one
  may frame the pages (clickjacking); ``nosniff``, ``no-referrer`` and ``no-store`` besides.
* **A session cookie, not the token.** A browser cannot send a bearer header on navigation, so
  the login form takes the admin token once (compared in constant time by the control port's
  one :class:`~eecp.control.auth.Guard`) and sets a cookie holding a random session id: the
  token itself never rests in the browser. Sessions live in this process's memory
  (:class:`Sessions`: at most :data:`MAX_SESSIONS`, each for :data:`SESSION_TTL_SEC`; a
  restart logs everyone out), keyed by the id's SHA-256 so that a lookup's timing says nothing
  of the ids. The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other
  site's page sends it) and ``Secure`` when the request came over https (a trusted proxy's
  ``X-Forwarded-Proto``), scoped to ``/admin``.
* **CSRF.** Besides SameSite=Strict, every POST must carry an ``Origin`` (or, without one, a
  ``Referer``) naming this host, or, when it has neither (``no-referrer`` makes a browser send
  ``Origin: null``), ``Sec-Fetch-Site: same-origin``; else 403 ``cross_origin``.
* **Brute force.** Login attempts are rate-limited (:class:`~eecp.core.ratelimit.SharedLimit`,
  per client and in all: :data:`LOGINS_PER_MIN`); beyond it 429 without looking at the token. A
  wrong token answers 401 with the form.
* Without ``EE_ADMIN_TOKEN`` the admin JSON views are open (start-up warns), and so is the
  dashboard: there is nothing to log in with.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

import jinja2
import trio
from quart import Blueprint, Response, request

from eecp.agents.registry import Registry
from eecp.control.admin import Bindings, app_view, list_apps
from eecp.control.auth import Guard
from eecp.core.clock import Clock
from eecp.core.ratelimit import SharedLimit
from eecp.dataplane.forwarded import (
    FORWARDED_HEADERS,
    Forwarding,
    TrustedProxies,
    client_address,
    forwarding_of,
)
from eecp.ledger.answers import ADMIN, Answer
from eecp.ledger.money import format_usd
from eecp.ledger.periods import period_of
from eecp.ledger.service import Ledger
from eecp.store.store import Store

COOKIE: Final = "eecp_admin"
COOKIE_PATH: Final = "/admin"
#: how long a session lasts from its login
SESSION_TTL_SEC: Final = 12 * 3600.0
#: sessions kept at once; a login beyond it ends the one closest to expiry
MAX_SESSIONS: Final = 64
#: login attempts a minute in all, and from any one client
LOGINS_PER_MIN: Final = 30
LOGINS_PER_CLIENT_PER_MIN: Final = 5
#: the login form's body (a token field): anything larger is refused unread
MAX_FORM_BYTES: Final = 8192
#: the time the login form's body has to arrive whole
BODY_TIMEOUT_SEC: Final = 15
#: how often the data pages reload themselves
REFRESH_SEC: Final = 15
#: nodes the ledger page shows (each is one read of the ledger)
NODES_SHOWN: Final = 100
#: the platform's own accounts the ledger page shows the balances of
PLATFORM_ACCOUNTS: Final = ("fee:platform", "slash:platform")

SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


class Sessions:
    """The logged-in browsers: random ids, each valid for ``ttl_sec`` from its login, at most
    ``max_count`` at once, kept by their SHA-256 (see the module docstring)."""

    def __init__(self, ttl_sec: float = SESSION_TTL_SEC, max_count: int = MAX_SESSIONS) -> None:
        self.ttl_sec = ttl_sec
        self.max_count = max_count
        self._expiry: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def open(self, now: float) -> str:
        """A new session's id (the cookie's value)."""
        self._expired(now)
        while len(self._expiry) >= self.max_count:  # the one closest to its end goes
            del self._expiry[min(self._expiry, key=self._expiry.__getitem__)]
        session_id = secrets.token_urlsafe(32)
        self._expiry[_digest(session_id)] = now + self.ttl_sec
        return session_id

    def valid(self, session_id: str | None, now: float) -> bool:
        if not session_id or len(session_id) > 128:
            return False
        expiry = self._expiry.get(_digest(session_id))
        if expiry is None:
            return False
        if now >= expiry:
            del self._expiry[_digest(session_id)]
            return False
        return True

    def close(self, session_id: str | None) -> None:
        if session_id and len(session_id) <= 128:
            self._expiry.pop(_digest(session_id), None)

    def _expired(self, now: float) -> None:
        for key in [k for k, at in self._expiry.items() if now >= at]:
            del self._expiry[key]


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


@dataclass(frozen=True)
class DashboardDeps:
    """What the dashboard reads (the admin views' own parts)."""

    guard: Guard
    registry: Registry
    clock: Clock
    store: Store
    audit_entries_shown: int
    trusted_proxies: TrustedProxies
    bindings: Bindings | None = None
    ledger: Ledger | None = None


def templates() -> jinja2.Environment:
    """The dashboard's templates (package data of :mod:`eecp.control`), every one escaped."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("eecp.control", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["usd"] = lambda micros: format_usd(int(micros)) if micros is not None else "—"
    return env


def blueprint(deps: DashboardDeps) -> Blueprint:
    """The dashboard's routes (see the module docstring)."""
    bp = Blueprint("dashboard", __name__)
    env = templates()
    css = resources.files("eecp.control").joinpath("static/dashboard.css").read_bytes()
    sessions = Sessions()
    logins = SharedLimit(LOGINS_PER_MIN, LOGINS_PER_CLIENT_PER_MIN)

    def page(template: str, status: int = 200, **values: Any) -> Response:
        values.setdefault("logged_in", not deps.guard.is_open())
        html = env.get_template(template).render(ledger=deps.ledger is not None, **values)
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    def signed_in() -> bool:
        return deps.guard.is_open() or sessions.valid(request.cookies.get(COOKIE), deps.clock.now())

    def to_login() -> Response:
        return see_other("/admin/login")

    @bp.after_request
    async def secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    @bp.get("/admin/dashboard.css")
    async def stylesheet() -> Response:
        return Response(css, content_type="text/css; charset=utf-8")

    @bp.get("/admin")
    async def overview() -> Response:
        if not signed_in():
            return to_login()
        return page("apps.html", apps=list_apps(deps.registry, deps.clock.now())["apps"],
                    refresh=REFRESH_SEC)

    @bp.get("/admin/apps/<app_name>")
    async def app_page(app_name: str) -> Response:
        if not signed_in():
            return to_login()
        name = app_name.lower()
        doc = await app_view(deps.registry, deps.clock, deps.store, name,
                             deps.audit_entries_shown, deps.bindings)
        if doc is None:
            return page("missing.html", 404, what="app", name=name)
        return page("app.html", app=doc, tcb=tcb_statuses(doc["audit"]), refresh=REFRESH_SEC)

    @bp.get("/admin/ledger")
    async def ledger_page() -> Response:
        if not signed_in():
            return to_login()
        if deps.ledger is None:
            return page("missing.html", 404, what="ledger", name="EE_LEDGER_ENABLED is off")
        view = await ledger_view(deps.ledger, deps.clock, request.args.get("period"))
        return page("ledger.html", refresh=REFRESH_SEC, **view)

    @bp.get("/admin/login")
    async def login_form() -> Response:
        if signed_in():
            return see_other("/admin")
        return page("login.html", error=None, logged_in=False)

    @bp.post("/admin/login")
    async def login() -> Response:
        forwarding = _forwarding(deps.trusted_proxies)
        if not _same_origin(forwarding):
            return page("login.html", 403, error="cross_origin", logged_in=False)
        now = deps.clock.now()
        if not logins.allow(client_address(forwarding, deps.trusted_proxies), now):
            response = page("login.html", 429, error="too_many_attempts", logged_in=False)
            response.headers["Retry-After"] = "60"
            return response
        token = await _form_token()
        if token is None or not deps.guard.admits_token(token):
            return page("login.html", 401, error="token_invalid", logged_in=False)
        response = see_other("/admin")
        response.set_cookie(COOKIE, sessions.open(now), max_age=int(SESSION_TTL_SEC),
                            path=COOKIE_PATH, secure=forwarding.proto == "https",
                            httponly=True, samesite="Strict")
        return response

    @bp.post("/admin/logout")
    async def logout() -> Response:
        if not _same_origin(_forwarding(deps.trusted_proxies)):
            return page("login.html", 403, error="cross_origin", logged_in=False)
        sessions.close(request.cookies.get(COOKIE))
        response = to_login()
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="Strict")
        return response

    return bp


def see_other(path: str) -> Response:
    """303 to ``path`` (same origin: a path, never a URL taken from the request)."""
    return Response("", status=303, headers={"Location": path})


def tcb_statuses(audit: list[dict[str, Any]]) -> dict[str, str]:
    """Each agent's TCB status as its newest audit entry with one says (newest first)."""
    found: dict[str, str] = {}
    for entry in audit:
        if entry["tcb_status"]:
            found.setdefault(entry["agent_id"], entry["tcb_status"])
    return found


async def ledger_view(ledger: Ledger, clock: Clock, period: str | None) -> dict[str, Any]:
    """The ledger page's documents, each from the service's own read call (the admin's
    ``GET /v1/nodes``, ``/v1/nodes/{id}``, ``/v1/balances/{account}``,
    ``/v1/settlements/{period}``); an answer that is not 200 is shown as its error."""
    listed, error = _doc(await ledger.list_nodes([("include_ineligible", "true")]))
    offers = list(listed.get("nodes", []))
    nodes = []
    for offer in offers[:NODES_SHOWN]:
        detail, detail_error = _doc(await ledger.get_node(ADMIN, str(offer["node_id"])))
        nodes.append({"offer": offer, "node": detail, "error": detail_error})
    accounts = [_doc(await ledger.balance(ADMIN, account)) for account in PLATFORM_ACCOUNTS]
    if period is None:  # the latest period that may be settled
        period = period_of(clock.now(), ledger.settings.period).previous().id
    settled, settled_error = _doc(await ledger.settlements(period[:64]))
    return {"nodes": nodes, "nodes_error": error, "nodes_total": len(offers),
            "nodes_shown": NODES_SHOWN, "accounts": accounts, "period": period[:64],
            "settlements": settled.get("results", []), "settlements_error": settled_error}


def _doc(answer: Answer) -> tuple[dict[str, Any], str | None]:
    """An answer's JSON document, and its error reason unless it is 200."""
    doc = json.loads(answer.body)
    if answer.status == 200:
        return doc, None
    return {}, str(doc.get("reason") or doc.get("error") or answer.status)


def _forwarding(trusted: TrustedProxies) -> Forwarding:
    """Who the request came from, over what, to which host (a trusted proxy's word)."""
    inbound = {name: ", ".join(request.headers.getlist(name)) for name in FORWARDED_HEADERS}
    return forwarding_of(inbound, request.remote_addr or "", request.scheme,
                         request.headers.get("Host"), trusted)


def _same_origin(forwarding: Forwarding) -> bool:
    """Whether a POST came from this host's own page: its ``Origin`` (else its ``Referer``)
    names this host, or, where the pages' ``Referrer-Policy: no-referrer`` makes a browser send
    ``Origin: null`` and no ``Referer``, its ``Sec-Fetch-Site`` says ``same-origin`` (a header
    no page can set; another site's form or a sandboxed frame sends ``cross-site``)."""
    origin = request.headers.get("Origin")
    source = origin if origin and origin != "null" else request.headers.get("Referer")
    if not source:
        return request.headers.get("Sec-Fetch-Site") == "same-origin"
    if not forwarding.host:
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == forwarding.host.lower()


async def _form_token() -> str | None:
    """The login form's ``token`` field (None: no such field, or a body too large or late)."""
    declared = request.content_length
    if declared is None or declared > MAX_FORM_BYTES:
        return None
    with trio.move_on_after(BODY_TIMEOUT_SEC):
        form = await request.form
        token = form.get("token")
        return token.strip() if isinstance(token, str) and token.strip() else None
    return None

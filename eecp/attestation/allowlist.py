"""Allowlists: what a released app's agents must measure to be accepted.

An app's allowlist is a JSON file published as an asset (``agent-attestation-allowlist.json`` by
default) of the GitHub release that the agent registers with (``repo`` + ``release_tag``). This
module is where the bytes come from, :class:`AllowlistSource`: a memory cache, then an
operator's local directory (air-gapped hosts), then the GitHub releases API. What they must say
(:func:`~eecp.attestation.allowlist_doc.parse_allowlist`, pure and strict) and which refs are
well-formed (:func:`~eecp.attestation.allowlist_doc.check_ref`) are
:mod:`eecp.attestation.allowlist_doc`.

Reasons raised here (all ``AllowlistError``): ``allowlist_invalid_ref`` (the repo or tag is not a
well-formed GitHub name; no request is made), ``allowlist_not_found``, ``allowlist_unavailable``,
``allowlist_malformed:<field>`` and ``allowlist_rate_limited``.

Every agent names its own repo and tag, so what reaches GitHub is bounded three ways: only a
quote that verified gets this far (the engine's order), a release without a (valid) allowlist
is remembered for a while, and the fetches themselves are rate-limited per platform (the PPID
the engine passes) and in total (``EE_ALLOWLIST_FETCHES_PER_MIN``,
``EE_ALLOWLIST_FETCHES_PER_PLATFORM_PER_MIN``). Cache hits, local files and remembered misses
cost nothing. Beyond the limit a release with a copy past its TTL is served that copy (a known
app's periodic re-attestation never waits for a flood to pass); any other is refused
``allowlist_rate_limited`` without a request, and the agent retries later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

from eecp.attestation.allowlist_doc import (
    MAX_ALLOWLIST_BYTES,
    Allowlist,
    check_ref,
    malformed,
    parse_allowlist,
)
from eecp.core.clock import Clock
from eecp.core.config import Config
from eecp.core.errors import AllowlistError
from eecp.core.ratelimit import SharedLimit

log = logging.getLogger("eecp.allowlist")

#: Release metadata lists every asset of the release; generous, but still bounded.
MAX_RELEASE_JSON_BYTES = 8 * 1024 * 1024


@dataclass
class _Entry:
    allowlist: Allowlist
    fetched_at: float
    #: when the copy was last confirmed (fetched, or kept through an outage); the TTL runs from it
    checked_at: float


@dataclass
class _Slot:
    """Per-(repo, tag) coordination: one fetch at a time; waiters share its outcome."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0
    attempts: int = 0  # completed (not cancelled) fetch attempts
    last_error: AllowlistError | None = None


#: how long a release without a (valid) allowlist is answered from memory: any agent may name
#: any repo and tag, and each miss would otherwise be a GitHub request on the operator's token
NEGATIVE_TTL_SEC = 60.0
_REMEMBERED_MISSES = ("allowlist_not_found", "allowlist_malformed")
RATE_LIMITED = "allowlist_rate_limited"


class _Unavailable(Exception):
    """GitHub could not answer (transport error, timeout, 5xx, 401/403/429, garbage)."""


class AllowlistSource:
    """Allowlists by (repo, release tag): memory cache → ``local_dir`` → GitHub releases API.

    ``get`` raises ``AllowlistError`` only: ``allowlist_invalid_ref``, ``allowlist_not_found``,
    ``allowlist_unavailable`` or ``allowlist_malformed:<field>``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        clock: Clock,
        github_api_url: str,
        asset_name: str,
        token: str | None,
        local_dir: Path | None,
        cache_ttl_sec: float,
        fetch_timeout_sec: float = 15,
        max_cache_entries: int = 4096,
        fetch_limit: SharedLimit | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._api = github_api_url.rstrip("/")
        self._asset_name = asset_name
        self._token = token
        self._local_dir = local_dir
        self._ttl = cache_ttl_sec
        self._fetch_timeout = fetch_timeout_sec
        self._max_entries = max_cache_entries
        # Insertion-ordered; the oldest confirmation is evicted first when full.
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._slots: dict[tuple[str, str], _Slot] = {}
        # (repo, tag) → the refusal and when: insertion-ordered, bounded like the cache
        self._misses: dict[tuple[str, str], tuple[AllowlistError, float]] = {}
        self._negative_ttl = min(cache_ttl_sec, NEGATIVE_TTL_SEC)
        # requests to GitHub, per platform and in total (None: unlimited)
        self._fetch_limit = fetch_limit

    @classmethod
    def from_config(
        cls, config: Config, client: httpx.AsyncClient, clock: Clock
    ) -> AllowlistSource:
        """An ``AllowlistSource`` configured from ``EE_ALLOWLIST_*`` / ``EE_GITHUB_*``."""
        return cls(
            client=client,
            clock=clock,
            github_api_url=config.github_api_url,
            asset_name=config.allowlist_asset,
            token=config.github_token,
            local_dir=config.allowlist_dir,
            cache_ttl_sec=config.allowlist_cache_ttl_sec,
            fetch_limit=SharedLimit(config.allowlist_fetches_per_min,
                                    config.allowlist_fetches_per_platform_per_min),
        )

    def __repr__(self) -> str:  # keep the token out of any repr that reaches a log
        return f"AllowlistSource(api={self._api!r}, asset={self._asset_name!r})"

    async def get(self, repo: str, release_tag: str, platform: str | None = None) -> Allowlist:
        """The allowlist published for ``repo`` at ``release_tag``, for a quote from
        ``platform`` (whose share of the GitHub fetches a fetch spends; None: only the total).

        Concurrent calls for the same key share one fetch. A cached copy past its TTL is served
        (with a warning) when GitHub is unavailable, and (quietly) when the fetch limit is
        reached.
        """
        owner, name = check_ref(repo, release_tag)
        key = (repo, release_tag)
        entry = self._cache.get(key)
        if entry is not None and self._fresh(entry):
            return entry.allowlist
        miss = self._misses.get(key)
        if miss is not None and self._clock.now() - miss[1] < self._negative_ttl:
            raise AllowlistError(miss[0].reason, miss[0].detail)

        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.users += 1
        try:
            seen = slot.attempts
            async with slot.lock:
                if slot.attempts != seen:
                    # A fetch finished while we queued: its answer is as recent as ours would be
                    # (this also makes cache_ttl_sec = 0 share fetches between concurrent callers).
                    if slot.last_error is not None:
                        raise AllowlistError(slot.last_error.reason, slot.last_error.detail)
                    entry = self._cache.get(key)
                    if entry is not None:
                        return entry.allowlist
                entry = self._cache.get(key)
                if entry is not None and self._fresh(entry):
                    return entry.allowlist
                try:
                    allowlist = await self._load(key, owner, name, release_tag, entry, platform)
                except AllowlistError as exc:
                    if exc.reason == RATE_LIMITED:
                        # this caller's platform (or the total) is spent, not the release's:
                        # a caller queued behind it makes its own attempt
                        raise
                    slot.last_error = exc
                    slot.attempts += 1
                    self._remember_miss(key, exc)
                    raise
                slot.last_error = None
                slot.attempts += 1
                return allowlist
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[key]

    def _remember_miss(self, key: tuple[str, str], exc: AllowlistError) -> None:
        if not exc.reason.startswith(_REMEMBERED_MISSES) or self._negative_ttl <= 0:
            return  # unavailable: GitHub may answer the next caller
        self._misses.pop(key, None)
        while len(self._misses) >= self._max_entries:
            del self._misses[next(iter(self._misses))]
        self._misses[key] = (exc, self._clock.now())

    def _fresh(self, entry: _Entry) -> bool:
        return self._clock.now() - entry.checked_at < self._ttl

    def _store(self, key: tuple[str, str], allowlist: Allowlist) -> None:
        self._cache.pop(key, None)
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]
        now = self._clock.now()
        self._cache[key] = _Entry(allowlist, now, now)

    async def _load(
        self, key: tuple[str, str], owner: str, name: str, tag: str, stale: _Entry | None,
        platform: str | None,
    ) -> Allowlist:
        repo = f"{owner}/{name}"
        if self._local_dir is not None:
            data = await self._read_local(self._local_dir / owner / name / f"{tag}.json")
            if data is not None:
                # An operator's file is authoritative: if it is malformed we say so rather than
                # quietly falling back to GitHub. It is cached like a download, so an edit to it
                # is seen within one TTL.
                allowlist = parse_allowlist(data)
                self._store(key, allowlist)
                log.info("allowlist %s@%s loaded from %s", repo, tag, self._local_dir)
                return allowlist

        if self._fetch_limit is not None and not self._fetch_limit.allow(platform,
                                                                         self._clock.now()):
            if stale is not None:
                # not marked re-checked: the next caller asks GitHub again when there is room
                return stale.allowlist
            raise AllowlistError(RATE_LIMITED, f"{repo}@{tag}: too many allowlist fetches; "
                                 "retry later")
        try:
            with trio.fail_after(self._fetch_timeout):
                data = await self._fetch_github(owner, name, tag)
        except (_Unavailable, trio.TooSlowError) as exc:
            problem = str(exc) if isinstance(exc, _Unavailable) else "GitHub timed out"
            if stale is None:
                log.warning("allowlist %s@%s unavailable: %s", repo, tag, problem)
                raise AllowlistError("allowlist_unavailable", f"{repo}@{tag}: {problem}") from None
            # An allowlist is immutable per tag in practice (a release asset is replaced only by
            # deliberately deleting and re-uploading it), so the last good copy is a far better
            # answer than refusing every agent while GitHub is down. It counts as re-checked
            # now, so an outage costs one failed request per TTL, not one per registration.
            log.warning(
                "allowlist %s@%s: GitHub unavailable (%s); serving the copy cached %.0f s ago",
                repo,
                tag,
                problem,
                self._clock.now() - stale.fetched_at,
            )
            stale.checked_at = self._clock.now()
            return stale.allowlist
        except AllowlistError as exc:
            if exc.reason == "allowlist_not_found":
                # A definitive "gone" (release or asset deleted) is how a release is withdrawn:
                # forget the cached copy instead of serving it on.
                self._cache.pop(key, None)
            raise

        allowlist = parse_allowlist(data)  # malformed content raises here and is never cached
        self._store(key, allowlist)
        log.info("allowlist %s@%s fetched from GitHub (%d bytes)", repo, tag, len(data))
        return allowlist

    async def _read_local(self, path: Path) -> bytes | None:
        def read() -> bytes | None:
            try:
                with path.open("rb") as fh:
                    # one byte over the limit is enough for parse_allowlist to say too_large
                    return fh.read(MAX_ALLOWLIST_BYTES + 1)
            except (FileNotFoundError, NotADirectoryError):
                return None

        try:
            return await trio.to_thread.run_sync(read)
        except OSError as exc:
            # The file exists but cannot be read: an operator problem, not "no local copy".
            log.warning("allowlist file %s unreadable: %s", path, exc)
            raise AllowlistError(
                "allowlist_unavailable", f"local allowlist unreadable ({type(exc).__name__})"
            ) from None

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {
            "Accept": accept,
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "eecp",
        }
        if self._token:
            # httpx drops Authorization when a redirect leaves the API's origin (asset downloads
            # redirect to a storage host), so the token is only ever sent to github_api_url.
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _fetch_github(self, owner: str, name: str, tag: str) -> bytes:
        base = f"{self._api}/repos/{owner}/{name}/releases"
        where = f"{owner}/{name}@{tag}"
        try:
            status, body = await self._get(
                f"{base}/tags/{quote(tag, safe='')}",
                "application/vnd.github+json",
                MAX_RELEASE_JSON_BYTES,
            )
            if status in (404, 410):
                raise AllowlistError("allowlist_not_found", f"no release {where}")
            _check_status(status, "release")
            asset_id = self._find_asset(body, where)
            # The download URL is built from the asset id, never taken from the response, so a
            # strange release document cannot point the token somewhere else.
            status, data = await self._get(
                f"{base}/assets/{asset_id}", "application/octet-stream", MAX_ALLOWLIST_BYTES
            )
        except httpx.HTTPError as exc:
            raise _Unavailable(f"GitHub request failed ({type(exc).__name__})") from None
        if status in (404, 410):
            raise AllowlistError(
                "allowlist_not_found", f"asset {self._asset_name} of {where} disappeared"
            )
        _check_status(status, "asset")
        return data

    async def _get(self, url: str, accept: str, limit: int) -> tuple[int, bytes]:
        async with self._client.stream(
            "GET", url, headers=self._headers(accept), follow_redirects=True
        ) as resp:
            if resp.status_code != 200:
                return resp.status_code, b""
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    if limit == MAX_ALLOWLIST_BYTES:
                        malformed("too_large", f"asset is over {MAX_ALLOWLIST_BYTES} bytes")
                    raise _Unavailable("GitHub release document is implausibly large")
            return 200, bytes(body)

    def _find_asset(self, body: bytes, where: str) -> int:
        try:
            release = json.loads(body)
        except (ValueError, RecursionError):
            raise _Unavailable("GitHub returned an unreadable release document") from None
        assets = release.get("assets") if isinstance(release, dict) else None
        if not isinstance(assets, list):
            raise _Unavailable("GitHub release document has no asset list")
        for asset in assets:
            if isinstance(asset, dict) and asset.get("name") == self._asset_name:
                asset_id = asset.get("id")
                if isinstance(asset_id, int) and not isinstance(asset_id, bool):
                    return asset_id
                raise _Unavailable("GitHub release asset has no numeric id")
        raise AllowlistError(
            "allowlist_not_found", f"release {where} has no asset named {self._asset_name}"
        )


def _check_status(status: int, what: str) -> None:
    # 401/403/429 are credentials or rate limits and 5xx is GitHub itself: none of them says the
    # allowlist does not exist, so they are "unavailable" (and a cached copy may be served).
    if status != 200:
        raise _Unavailable(f"GitHub answered {status} for the {what}")

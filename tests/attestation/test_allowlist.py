"""eecp.allowlist: strict parsing of the upstream format, and fetching through a fake GitHub."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eecp.attestation.allowlist import NEGATIVE_TTL_SEC, AllowlistSource
from eecp.attestation.allowlist_doc import MAX_ALLOWLIST_BYTES, Allowlist, parse_allowlist
from eecp.core.clock import FixedClock
from eecp.core.errors import AllowlistError
from eecp.core.ratelimit import SharedLimit
from tests.fake_github import FakeGitHub, open_fake_github
from tests.vectors import vector

ASSET = "agent-attestation-allowlist.json"
REPO = "easyenclave/demo-app"
TAG = "v1.2.3"
T0 = 1_767_000_000.0

RTMR0 = (
    "4686d15bb2d6b5c2d200d16248c804bb37940cd7092d4d39ec4f29477d93d664"
    "b62ed349f9975e9359655b7ea88dba7c"
)
RTMR2 = (
    "e55408a1400c7c82611fafa71fde37197f2f3ecfd83c49a71b51be60f2bc8638"
    "abb57cbcb745b522445e03ca5f7fa89a"
)


def upstream_bytes() -> bytes:
    return vector("upstream/agent-attestation-allowlist.json").read_bytes()


def doc(**changes: Any) -> dict[str, Any]:
    """A valid allowlist document (self-contained: no shared vector needed)."""
    d: dict[str, Any] = {
        "version": "1.0",
        "release_tag": TAG,
        "measurements": {
            "agent_dir_sha256": "aa" * 32,
            "agent_py_sha256": "bb" * 32,
            "vm_image_id": "tag=v1.2.3\nsha256=" + "cc" * 32,
            "sealed": False,
        },
        "report_data": "dd" * 64,
        "quote_measurements": {f"rtmr{i}": f"{i:02x}" * 48 for i in range(4)},
    }
    d.update(changes)
    return d


def enc(d: object) -> bytes:
    return json.dumps(d).encode()


# --------------------------------------------------------------------------------------------
# parsing


def test_parse_real_upstream_vector() -> None:
    al = parse_allowlist(upstream_bytes())
    assert al.sealed is True
    assert al.rtmrs[0] == bytes.fromhex(RTMR0)
    assert al.rtmrs[2] == bytes.fromhex(RTMR2)
    assert al.rtmrs[3] == bytes(48)
    assert all(len(r) == 48 for r in al.rtmrs)
    assert al.report_data is not None and len(al.report_data) == 64
    assert al.report_data[:4] == bytes.fromhex("4c09bc0c")
    assert al.report_data[32:] == bytes(32)
    assert al.mrtd is None
    assert al.version == "1.0"
    assert al.release_tag == "dev-latest"
    assert al.created_at == "2026-01-12T19:11:56.987846+00:00"
    assert dict(al.measurements) == {
        "agent_dir_sha256": "a7ac29d450d79c89fe3e328c8fc5771b2a82b85208df51e944c70541f4107a8d",
        "agent_py_sha256": "46d214c1ff726fd2d220c2541751540dca2bf1edfd977d49f7145a68072510ed",
        "vm_image_id": "tag=dev-latest\n"
        "sha256=545d36615d95452a1312deca1f6e260fe8f94680319b4ec3b527ece111cc4f23",
        "sealed": True,
    }


def test_allowlist_is_immutable() -> None:
    al = parse_allowlist(enc(doc()))
    with pytest.raises(TypeError):
        al.measurements["sealed"] = True  # type: ignore[index]
    with pytest.raises(AttributeError):
        al.report_data = None  # type: ignore[misc]
    assert al.sealed is False
    assert hash(al) == hash(parse_allowlist(enc(doc())))
    assert al == parse_allowlist(enc(doc()))


def test_hex_is_case_insensitive_and_normalised() -> None:
    d = doc()
    d["measurements"]["agent_py_sha256"] = "AB" * 32
    d["quote_measurements"]["rtmr1"] = "Ef" * 48
    d["quote_measurements"]["mrtd"] = "0A" * 48
    al = parse_allowlist(enc(d))
    assert al.measurements["agent_py_sha256"] == "ab" * 32
    assert al.rtmrs[1] == b"\xef" * 48
    assert al.mrtd == b"\x0a" * 48


def test_optional_fields_and_unknown_fields() -> None:
    d = doc(report_data=None, extra={"anything": [1, 2]}, version=None)
    del d["release_tag"]
    d["measurements"]["future_key"] = "ignored"
    d["quote_measurements"]["rtmr9"] = "zz"
    al = parse_allowlist(enc(d))
    assert al.report_data is None
    assert al.version is None and al.release_tag is None and al.created_at is None
    assert set(al.measurements) == {"agent_dir_sha256", "agent_py_sha256", "vm_image_id", "sealed"}
    no_report = doc()
    del no_report["report_data"]
    assert parse_allowlist(enc(no_report)).report_data is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = d
        for p in parents:
            target = target[p]
        target[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = d
        for p in parents:
            target = target[p]
        del target[last]

    return change


MALFORMED_DOCS = [
    ("measurements", _delete("measurements")),
    ("measurements", _set("measurements", [])),
    ("measurements.agent_dir_sha256", _delete("measurements.agent_dir_sha256")),
    ("measurements.agent_dir_sha256", _set("measurements.agent_dir_sha256", "aa" * 31)),
    ("measurements.agent_py_sha256", _set("measurements.agent_py_sha256", "g" * 64)),
    ("measurements.agent_py_sha256", _set("measurements.agent_py_sha256", "aa " * 21 + "a")),
    ("measurements.agent_py_sha256", _set("measurements.agent_py_sha256", "aa" * 32 + "\n")),
    ("measurements.agent_py_sha256", _set("measurements.agent_py_sha256", 12)),
    ("measurements.vm_image_id", _set("measurements.vm_image_id", "")),
    ("measurements.vm_image_id", _delete("measurements.vm_image_id")),
    ("measurements.sealed", _set("measurements.sealed", "true")),
    ("measurements.sealed", _set("measurements.sealed", 1)),
    ("measurements.sealed", _delete("measurements.sealed")),
    ("report_data", _set("report_data", "dd" * 32)),
    ("report_data", _set("report_data", 5)),
    ("quote_measurements", _delete("quote_measurements")),
    ("quote_measurements", _set("quote_measurements", "x")),
    ("quote_measurements.rtmr0", _delete("quote_measurements.rtmr0")),
    ("quote_measurements.rtmr2", _set("quote_measurements.rtmr2", "00" * 47)),
    ("quote_measurements.rtmr3", _set("quote_measurements.rtmr3", "00" * 49)),
    ("quote_measurements.rtmr1", _set("quote_measurements.rtmr1", None)),
    ("quote_measurements.mrtd", _set("quote_measurements.mrtd", "00" * 32)),
    ("version", _set("version", 1.0)),
    ("release_tag", _set("release_tag", ["v1"])),
    ("created_at", _set("created_at", 0)),
]


@pytest.mark.parametrize(
    ("field", "change"), MALFORMED_DOCS, ids=[f"{i}-{f}" for i, (f, _) in enumerate(MALFORMED_DOCS)]
)
def test_malformed_document(field: str, change: Callable[[dict[str, Any]], None]) -> None:
    d = copy.deepcopy(doc())
    change(d)
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(enc(d))
    assert info.value.reason == f"allowlist_malformed:{field}"
    assert field in info.value.detail


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "allowlist_malformed:json"),
        (b"{", "allowlist_malformed:json"),
        (b"\xff\xfe\x00garbage", "allowlist_malformed:json"),
        (b"[]", "allowlist_malformed:json"),
        (b'"a string"', "allowlist_malformed:json"),
        (b"null", "allowlist_malformed:json"),
        (b"[" * 100_000 + b"]" * 100_000, "allowlist_malformed:json"),
        (b'{"measurements": NaN}', "allowlist_malformed:json"),
        (b'{"version": "1", "version": "2"}', "allowlist_malformed:json"),
        (b" " * (MAX_ALLOWLIST_BYTES + 1), "allowlist_malformed:too_large"),
    ],
    ids=["empty", "truncated", "binary", "array", "string", "null", "deep", "nan", "dup", "big"],
)
def test_malformed_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(data)
    assert info.value.reason == reason


def test_duplicate_sealed_key_is_refused() -> None:
    text = enc(doc()).replace(b'"sealed": false', b'"sealed": false, "sealed": true')
    assert text.count(b'"sealed"') == 2
    with pytest.raises(AllowlistError) as info:
        parse_allowlist(text)
    assert info.value.reason == "allowlist_malformed:json"
    assert "sealed" in info.value.detail


def test_exactly_at_size_limit_is_parsed() -> None:
    base = enc(doc())
    padded = base[:-1] + b" " * (MAX_ALLOWLIST_BYTES - len(base)) + b"}"
    assert len(padded) == MAX_ALLOWLIST_BYTES
    assert parse_allowlist(padded).rtmrs[3] == b"\x03" * 48


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_allowlist_error(data: bytes) -> None:
    try:
        parse_allowlist(data)
    except AllowlistError as exc:
        assert exc.reason.startswith("allowlist_malformed:")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_paths = st.sampled_from(
    [
        "measurements",
        "measurements.agent_dir_sha256",
        "measurements.vm_image_id",
        "measurements.sealed",
        "report_data",
        "quote_measurements",
        "quote_measurements.rtmr0",
        "quote_measurements.mrtd",
        "version",
    ]
)


@settings(max_examples=300)
@given(st.lists(st.tuples(_paths, _json), min_size=1, max_size=3))
def test_near_valid_documents_only_raise_allowlist_error(
    changes: list[tuple[str, Any]],
) -> None:
    d = copy.deepcopy(doc())
    for path, value in changes:
        # a parent may have been replaced by a non-object earlier
        with contextlib.suppress(KeyError, TypeError, IndexError):
            _set(path, value)(d)
    try:
        al = parse_allowlist(enc(d))
    except AllowlistError as exc:
        assert exc.reason.startswith("allowlist_malformed:")
    else:
        assert isinstance(al, Allowlist)
        assert all(len(r) == 48 for r in al.rtmrs)


# --------------------------------------------------------------------------------------------
# fetching, through real sockets


@asynccontextmanager
async def source_for(
    gh: FakeGitHub | None,
    clock: FixedClock,
    token: str | None = None,
    local_dir: Path | None = None,
    ttl: float = 300.0,
    fetch_timeout: float = 5.0,
    url: str | None = None,
    max_cache_entries: int = 4096,
    fetch_limit: SharedLimit | None = None,
) -> AsyncIterator[AllowlistSource]:
    async with httpx.AsyncClient() as client:
        yield AllowlistSource(
            client=client,
            clock=clock,
            github_api_url=url or (gh.url if gh else "http://127.0.0.1:9"),
            asset_name=ASSET,
            token=token,
            local_dir=local_dir,
            cache_ttl_sec=ttl,
            fetch_timeout_sec=fetch_timeout,
            max_cache_entries=max_cache_entries,
            fetch_limit=fetch_limit,
        )


def paths(gh: FakeGitHub) -> list[str]:
    return [r.path for r in gh.requests]


async def test_fetch_from_fake_github() -> None:
    async with open_fake_github() as gh:
        gh.add_release("easyenclave/demo-app", "dev-latest", {ASSET: upstream_bytes(), "x": b"{}"})
        async with source_for(gh, FixedClock(T0)) as src:
            al = await src.get("easyenclave/demo-app", "dev-latest")
        assert al.sealed is True
        assert al.rtmrs[0] == bytes.fromhex(RTMR0)
        asset_id = gh.releases[("easyenclave/demo-app", "dev-latest")].assets[0].id
        assert paths(gh) == [
            "/repos/easyenclave/demo-app/releases/tags/dev-latest",
            f"/repos/easyenclave/demo-app/releases/assets/{asset_id}",
        ]
        release_req, asset_req = gh.requests
        assert release_req.headers["accept"] == "application/vnd.github+json"
        assert release_req.headers["x-github-api-version"] == "2022-11-28"
        assert asset_req.headers["accept"] == "application/octet-stream"
        assert "authorization" not in release_req.headers


async def test_follows_download_redirect() -> None:
    async with open_fake_github(redirect_downloads=True) as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, FixedClock(T0)) as src:
            al = await src.get(REPO, TAG)
        assert al.rtmrs[2] == b"\x02" * 48
        assert paths(gh)[-1].startswith("/_storage/")
        assert len(gh.requests) == 3


async def test_bearer_token_sent_and_private_repo_needs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "ghp_secret_token_value_123"
    async with open_fake_github(token=token) as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())}, private=True)
        async with source_for(gh, FixedClock(T0)) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
        assert info.value.reason == "allowlist_unavailable"
        assert "401" in info.value.detail
        assert len(gh.requests) == 1

        async with source_for(gh, FixedClock(T0), token=token) as src:
            al = await src.get(REPO, TAG)
        assert al.measurements["agent_dir_sha256"] == "aa" * 32
        assert [r.headers.get("authorization") for r in gh.requests[1:]] == [
            f"Bearer {token}",
            f"Bearer {token}",
        ]
        assert token not in repr(src)
    assert token not in caplog.text
    assert "fetched from GitHub" in caplog.text


async def test_cache_hit_within_ttl_then_refetch_after() -> None:
    clock = FixedClock(T0)
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, clock, ttl=300) as src:
            first = await src.get(REPO, TAG)
            clock.advance(299)
            assert await src.get(REPO, TAG) is first
            assert len(gh.requests) == 2

            # a new upload under the same tag is seen only after the TTL
            gh.add_release(REPO, TAG, {ASSET: enc(doc(version="2.0"))})
            clock.advance(2)
            second = await src.get(REPO, TAG)
            assert len(gh.requests) == 4
            assert second.version == "2.0"
            assert first.version == "1.0"


async def test_stale_copy_served_when_github_down(caplog: pytest.LogCaptureFixture) -> None:
    clock = FixedClock(T0)
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, clock, ttl=60) as src:
            first = await src.get(REPO, TAG)
            clock.advance(3600)
            gh.server.up = False
            with caplog.at_level(logging.WARNING, logger="eecp.allowlist"):
                stale = await src.get(REPO, TAG)
            assert stale is first
            assert len(gh.requests) == 3  # it did try GitHub again
            assert "serving the copy cached 3600 s ago" in caplog.text

            # an outage costs one attempt per TTL, not one per call
            await src.get(REPO, TAG)
            assert len(gh.requests) == 3
            clock.advance(61)
            gh.server.up = True
            gh.fail_status = 502
            assert await src.get(REPO, TAG) is first
            assert len(gh.requests) == 4


async def test_release_not_found() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, "v0.0.1", {ASSET: enc(doc())})
        async with source_for(gh, FixedClock(T0)) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
        assert info.value.reason == "allowlist_not_found"
        assert f"{REPO}@{TAG}" in info.value.detail
        assert len(gh.requests) == 1


async def test_missing_asset_is_not_found() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {"other.json": enc(doc())})
        async with source_for(gh, FixedClock(T0)) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
        assert info.value.reason == "allowlist_not_found"
        assert ASSET in info.value.detail
        assert len(gh.requests) == 1


async def test_deleted_release_drops_cached_copy() -> None:
    clock = FixedClock(T0)
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, clock, ttl=60) as src:
            await src.get(REPO, TAG)
            gh.remove_release(REPO, TAG)
            clock.advance(61)
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
            assert info.value.reason == "allowlist_not_found"
            gh.server.up = False  # and the copy is not resurrected during an outage
            clock.advance(61)  # (past the remembered miss)
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
            assert info.value.reason == "allowlist_unavailable"


async def test_github_down_without_cache_is_unavailable() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        gh.server.up = False
        async with source_for(gh, FixedClock(T0)) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
            assert info.value.reason == "allowlist_unavailable"
            gh.server.up = True
            gh.fail_status = 503
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
            assert info.value.reason == "allowlist_unavailable"
            assert "503" in info.value.detail
        assert len(gh.requests) == 2


async def test_nothing_listening_is_unavailable() -> None:
    async with source_for(None, FixedClock(T0), url="http://127.0.0.1:9") as src:
        with pytest.raises(AllowlistError) as info:
            await src.get(REPO, TAG)
    assert info.value.reason == "allowlist_unavailable"


async def test_slow_github_times_out() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        gh.delay_sec = 10
        async with source_for(gh, FixedClock(T0), fetch_timeout=0.2) as src:
            start = trio.current_time()
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
            assert trio.current_time() - start < 5
        assert info.value.reason == "allowlist_unavailable"
        assert "timed out" in info.value.detail


async def test_a_malformed_asset_is_remembered_briefly() -> None:
    clock = FixedClock(T0)
    async with open_fake_github() as gh:
        bad = doc()
        bad["quote_measurements"]["rtmr2"] = "00"
        gh.add_release(REPO, TAG, {ASSET: enc(bad)})
        async with source_for(gh, clock) as src:
            for _ in range(2):
                with pytest.raises(AllowlistError) as info:
                    await src.get(REPO, TAG)
                assert info.value.reason == "allowlist_malformed:quote_measurements.rtmr2"
            assert len(gh.requests) == 2  # the second answer came from memory
            gh.add_release(REPO, TAG, {ASSET: enc(doc())})
            clock.advance(NEGATIVE_TTL_SEC)  # the operator's fix is seen within a minute
            assert (await src.get(REPO, TAG)).rtmrs[2] == b"\x02" * 48


async def test_misses_are_remembered_per_release_and_bounded() -> None:
    # any agent can name any repo and tag: a repeated miss must not be a GitHub request each
    clock = FixedClock(T0)
    async with open_fake_github() as gh, source_for(gh, clock, max_cache_entries=3) as src:

        async def asks(tag: str) -> int:
            before = len(gh.requests)
            with pytest.raises(AllowlistError, match="allowlist_not_found"):
                await src.get(REPO, tag)
            return len(gh.requests) - before

        first = await asks("v1")
        assert first > 0 and await asks("v1") == 0  # remembered
        assert await asks("v2") == first and await asks("v3") == first
        assert await asks("v4") == first  # the fourth miss evicts the oldest (v1)
        assert await asks("v4") == 0 and await asks("v1") == first
        clock.advance(NEGATIVE_TTL_SEC)
        assert await asks("v1") == first  # and a remembered miss ends after a minute


@pytest.mark.parametrize("release", ["no such repo", "no such tag", "no such asset",
                                     "malformed asset"])
async def test_every_kind_of_miss_is_remembered(release: str) -> None:
    clock = FixedClock(T0)
    async with open_fake_github() as gh, source_for(gh, clock) as src:
        repo = "nobody/nothing" if release == "no such repo" else REPO
        if release == "no such tag":
            gh.add_release(REPO, "v0.0.1", {ASSET: enc(doc())})
        elif release == "no such asset":
            gh.add_release(REPO, TAG, {"other.json": enc(doc())})
        elif release == "malformed asset":
            gh.add_release(REPO, TAG, {ASSET: b"[]"})
        reasons = []
        for _ in range(3):
            with pytest.raises(AllowlistError) as info:
                await src.get(repo, TAG)
            reasons.append(info.value.reason)
        assert len(set(reasons)) == 1 and reasons[0].startswith(
            ("allowlist_not_found", "allowlist_malformed"))
        asked = len(gh.requests)
        assert asked in (1, 2)  # one try: the release, and its asset when there is one
        clock.advance(NEGATIVE_TTL_SEC)
        with pytest.raises(AllowlistError):
            await src.get(repo, TAG)
        assert len(gh.requests) == 2 * asked


async def test_github_fetches_are_limited_per_platform_and_in_total() -> None:
    # any agent whose quote verified can name any release: one platform must not spend the
    # operator's GitHub quota, nor all platforms together more than the limit
    clock = FixedClock(T0)
    limit = SharedLimit(per_minute=5, per_key=2)
    async with open_fake_github() as gh, source_for(gh, clock, fetch_limit=limit) as src:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})

        async def reason(repo: str, tag: str, platform: str | None) -> str:
            try:
                await src.get(repo, tag, platform=platform)
            except AllowlistError as exc:
                return exc.reason
            return "ok"

        assert await reason(REPO, TAG, "p1") == "ok"  # one fetch, two requests
        assert await reason(REPO, TAG, "p1") == "ok"  # a cache hit is free
        assert len(gh.requests) == 2
        assert await reason("rnd/a", "v1", "p1") == "allowlist_not_found"  # p1's second
        assert [await reason(f"rnd/{n}", "v1", "p1") for n in "bcd"] == [
            "allowlist_rate_limited"] * 3
        assert len(gh.requests) == 3  # no request for those
        assert await reason("rnd/a", "v1", "p1") == "allowlist_not_found"  # remembered: free
        assert await reason("rnd/b", "v1", "p2") == "allowlist_not_found"  # others still fetch
        assert await reason("rnd/c", "v1", "p2") == "allowlist_not_found"
        assert await reason("rnd/d", "v1", None) == "allowlist_not_found"  # the total's fifth
        assert await reason("rnd/e", "v1", "p3") == "allowlist_rate_limited"  # the total spent
        assert len(gh.requests) == 6
        clock.advance(24)  # room for two more in total (5 a minute); p1 still spent
        assert await reason("rnd/e", "v1", "p3") == "allowlist_not_found"
        assert await reason("rnd/f", "v1", "p1") == "allowlist_rate_limited"
        assert await reason("rnd/f", "v1", "p4") == "allowlist_not_found"
        assert await reason("rnd/g", "v1", "p4") == "allowlist_rate_limited"
        assert len(gh.requests) == 8


async def test_a_copy_past_its_ttl_is_served_while_the_fetches_are_spent(
        tmp_path: Path) -> None:
    # a known release's re-check must not wait for a flood to pass; local files cost nothing
    clock = FixedClock(T0)
    owner, name = REPO.split("/")
    (tmp_path / owner / name).mkdir(parents=True)
    (tmp_path / owner / name / "local.json").write_bytes(enc(doc()))
    limit = SharedLimit(per_minute=2, per_key=0)
    async with open_fake_github() as gh, source_for(gh, clock, ttl=60, local_dir=tmp_path,
                                                    fetch_limit=limit) as src:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        first = await src.get(REPO, TAG, platform="p1")
        clock.advance(61)
        for other in ("rnd/a", "rnd/b"):  # a flood spends the fetches
            with pytest.raises(AllowlistError, match="not_found"):
                await src.get(other, "v1", platform="p2")
        assert len(gh.requests) == 4
        assert await src.get(REPO, TAG, platform="p1") is first  # stale, no request
        assert (await src.get(REPO, "local", platform="p1")).sealed is False  # from disk
        assert len(gh.requests) == 4
        clock.advance(30)  # room for one: the stale copy is re-checked at once
        assert await src.get(REPO, TAG, platform="p1") == first
        assert len(gh.requests) == 6


async def test_a_rate_limited_caller_leaves_the_fetch_to_the_one_queued_behind_it() -> None:
    # p1 is out of fetches; p2, queued for the same release behind it, fetches for itself
    # instead of taking p1's refusal as the release's answer
    limit = SharedLimit(per_minute=0, per_key=1)
    async with open_fake_github() as gh, source_for(gh, FixedClock(T0),
                                                    fetch_limit=limit) as src:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        with pytest.raises(AllowlistError):
            await src.get("rnd/a", "v1", platform="p1")
        results: dict[str, str] = {}

        async def one(platform: str) -> None:
            try:
                await src.get(REPO, TAG, platform=platform)
                results[platform] = "ok"
            except AllowlistError as exc:
                results[platform] = exc.reason

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "p1")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "p2")
        assert results == {"p1": "allowlist_rate_limited", "p2": "ok"}
        assert len(gh.requests) == 3


async def test_oversized_asset_is_too_large() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: b" " * (MAX_ALLOWLIST_BYTES + 10)})
        async with source_for(gh, FixedClock(T0)) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
        assert info.value.reason == "allowlist_malformed:too_large"


async def test_concurrent_gets_share_one_fetch() -> None:
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        gh.delay_sec = 0.05
        results: list[Allowlist] = []
        async with source_for(gh, FixedClock(T0), ttl=0) as src:

            async def one() -> None:
                results.append(await src.get(REPO, TAG))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
        assert len(results) == 8
        assert all(r is results[0] for r in results)
        assert len(gh.requests) == 2


async def test_concurrent_gets_share_one_failure() -> None:
    async with open_fake_github() as gh:
        gh.delay_sec = 0.05
        reasons: list[str] = []
        async with source_for(gh, FixedClock(T0)) as src:

            async def one() -> None:
                try:
                    await src.get(REPO, TAG)
                except AllowlistError as exc:
                    reasons.append(exc.reason)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(one)
        assert reasons == ["allowlist_not_found"] * 5
        assert len(gh.requests) == 1


async def test_local_dir_consulted_first(tmp_path: Path) -> None:
    owner, name = REPO.split("/")
    (tmp_path / owner / name).mkdir(parents=True)
    (tmp_path / owner / name / f"{TAG}.json").write_bytes(upstream_bytes())
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, FixedClock(T0), local_dir=tmp_path) as src:
            al = await src.get(REPO, TAG)
            assert al.sealed is True and al.release_tag == "dev-latest"  # the local file's
            assert gh.requests == []
            # other tags are not on disk: GitHub is asked
            gh.add_release(REPO, "v2", {ASSET: enc(doc())})
            assert (await src.get(REPO, "v2")).sealed is False
            assert len(gh.requests) == 2


async def test_malformed_local_file_does_not_fall_back(tmp_path: Path) -> None:
    owner, name = REPO.split("/")
    (tmp_path / owner / name).mkdir(parents=True)
    (tmp_path / owner / name / f"{TAG}.json").write_bytes(b"{not json")
    async with open_fake_github() as gh:
        gh.add_release(REPO, TAG, {ASSET: enc(doc())})
        async with source_for(gh, FixedClock(T0), local_dir=tmp_path) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(REPO, TAG)
        assert info.value.reason == "allowlist_malformed:json"
        assert gh.requests == []


@pytest.mark.parametrize(
    ("repo", "tag"),
    [
        ("../x", TAG),
        ("a/b/c", TAG),
        ("", TAG),
        ("owner", TAG),
        ("/name", TAG),
        ("owner/", TAG),
        ("own er/name", TAG),
        ("owner/..", TAG),
        ("owner/.", TAG),
        ("owner/na%2fme", TAG),
        ("owner/name?x=1", TAG),
        ("x" * 101 + "/name", TAG),
        (REPO, ""),
        (REPO, "../../etc/passwd"),
        (REPO, "a/b"),
        (REPO, ".."),
        (REPO, ".hidden"),
        (REPO, "v1..2"),
        (REPO, "v1\n"),
        (REPO, "x" * 129),
    ],
)
async def test_invalid_refs_refused_without_request(repo: str, tag: str, tmp_path: Path) -> None:
    async with open_fake_github() as gh:
        async with source_for(gh, FixedClock(T0), local_dir=tmp_path) as src:
            with pytest.raises(AllowlistError) as info:
                await src.get(repo, tag)
        assert info.value.reason == "allowlist_invalid_ref"
        assert gh.requests == []


async def test_plausible_refs_accepted() -> None:
    async with open_fake_github() as gh:
        for repo, tag in [("Org-1/.github", "v1.0.0+build.7"), ("a_b/c.d-e", "release-2026_01")]:
            gh.add_release(repo, tag, {ASSET: enc(doc())})
        async with source_for(gh, FixedClock(T0)) as src:
            assert (await src.get("Org-1/.github", "v1.0.0+build.7")).sealed is False
            assert (await src.get("a_b/c.d-e", "release-2026_01")).sealed is False
        assert paths(gh)[0] == "/repos/Org-1/.github/releases/tags/v1.0.0%2Bbuild.7"

"""A stand-in for the GitHub releases API on real sockets (built on ``tests.fakehttp``).

Register releases with ``add_release(repo, tag, {asset_name: bytes})``. It serves, like GitHub:

* ``GET /repos/{owner}/{repo}/releases/tags/{tag}`` — the release JSON with its ``assets``
  (``id``, ``name``, ``url``, ``browser_download_url``, ...);
* ``GET /repos/{owner}/{repo}/releases/assets/{id}`` — the asset bytes when the request says
  ``Accept: application/octet-stream``, the asset's JSON metadata otherwise (as GitHub does),
  optionally through a 302 to a separate download path (GitHub redirects to a storage host).

A release added with ``private=True`` needs ``Authorization: Bearer <token>`` (401 otherwise);
a wrong bearer token is refused with 401 everywhere, as GitHub refuses bad credentials.
``fail_status`` makes every request answer that status; ``delay_sec`` stalls every answer;
``server.up = False`` drops connections. Every request is in ``server.requests``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote

import trio

from tests.fakehttp import FakeServer, Request, Response, open_fake_http

_RELEASE = re.compile(r"/repos/([^/]+)/([^/]+)/releases/tags/([^/]+)")
_ASSET = re.compile(r"/repos/([^/]+)/([^/]+)/releases/assets/(\d+)")
_DOWNLOAD = re.compile(r"/_storage/(\d+)")


@dataclass
class _Asset:
    id: int
    repo: str
    name: str
    data: bytes
    private: bool


@dataclass
class _Release:
    id: int
    repo: str
    tag: str
    private: bool
    assets: list[_Asset] = field(default_factory=list)


@dataclass
class FakeGitHub:
    """The fake's state: change it between requests to script an upstream's behaviour."""

    token: str | None = None
    fail_status: int | None = None
    delay_sec: float = 0.0
    redirect_downloads: bool = False
    releases: dict[tuple[str, str], _Release] = field(default_factory=dict)
    assets: dict[int, _Asset] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _server: FakeServer | None = None

    @property
    def server(self) -> FakeServer:
        assert self._server is not None
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    def add_release(
        self, repo: str, tag: str, assets: dict[str, bytes], private: bool = False
    ) -> None:
        release = _Release(next(self._ids), repo, tag, private)
        for name, data in assets.items():
            asset = _Asset(next(self._ids), repo, name, data, private)
            release.assets.append(asset)
            self.assets[asset.id] = asset
        self.releases[(repo, tag)] = release

    def remove_release(self, repo: str, tag: str) -> None:
        release = self.releases.pop((repo, tag))
        for asset in release.assets:
            self.assets.pop(asset.id, None)

    # ---- request handling -----------------------------------------------------------------

    def _authorized(self, request: Request, private: bool) -> bool:
        auth = request.headers.get("authorization")
        if auth is not None and auth != f"Bearer {self.token}":
            return False  # bad credentials are refused even for public repos, like GitHub
        return not private or auth is not None

    def _asset_json(self, asset: _Asset) -> dict[str, object]:
        base = self.url
        tag = next(r.tag for r in self.releases.values() if asset in r.assets)
        return {
            "id": asset.id,
            "name": asset.name,
            "url": f"{base}/repos/{asset.repo}/releases/assets/{asset.id}",
            "browser_download_url": f"{base}/{asset.repo}/releases/download/{tag}/{asset.name}",
            "content_type": "application/octet-stream",
            "size": len(asset.data),
            "state": "uploaded",
        }

    async def handle(self, request: Request) -> Response:
        if self.delay_sec:
            await trio.sleep(self.delay_sec)
        if self.fail_status is not None:
            return _message(self.fail_status, "Server Error")
        if request.method != "GET":
            return _message(404, "Not Found")

        if m := _RELEASE.fullmatch(request.path):
            repo, tag = f"{m[1]}/{m[2]}", unquote(m[3])
            release = self.releases.get((repo, tag))
            if release is not None and not self._authorized(request, release.private):
                return _message(401, "Bad credentials")
            if release is None:
                return _message(404, "Not Found")
            body = {
                "id": release.id,
                "tag_name": release.tag,
                "name": release.tag,
                "draft": False,
                "prerelease": False,
                "assets": [self._asset_json(a) for a in release.assets],
            }
            return Response.json(json.dumps(body))

        if m := _ASSET.fullmatch(request.path):
            asset = self.assets.get(int(m[3]))
            if asset is None or asset.repo != f"{m[1]}/{m[2]}":
                return _message(404, "Not Found")
            if not self._authorized(request, asset.private):
                return _message(401, "Bad credentials")
            if request.headers.get("accept") != "application/octet-stream":
                return Response.json(json.dumps(self._asset_json(asset)))
            if self.redirect_downloads:
                return Response(302, b"", [("location", f"{self.url}/_storage/{asset.id}")])
            return _octets(asset.data)

        if m := _DOWNLOAD.fullmatch(request.path):
            # the "storage host": no credentials needed (GitHub signs the redirect URL instead)
            asset = self.assets.get(int(m[1]))
            return _message(404, "Not Found") if asset is None else _octets(asset.data)

        return _message(404, "Not Found")


def _message(status: int, message: str) -> Response:
    return Response.json(json.dumps({"message": message}), status=status)


def _octets(data: bytes) -> Response:
    return Response(200, data, [("content-type", "application/octet-stream")])


@asynccontextmanager
async def open_fake_github(
    token: str | None = None, redirect_downloads: bool = False
) -> AsyncIterator[FakeGitHub]:
    """A ``FakeGitHub`` listening on 127.0.0.1 for the duration of the ``async with``."""
    fake = FakeGitHub(token=token, redirect_downloads=redirect_downloads)
    async with open_fake_http(fake.handle) as server:
        fake._server = server
        yield fake

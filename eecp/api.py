"""The control surface: a quart-trio app served by hypercorn on the control port.

Routes so far: ``GET /health``. The tunnel, resolve, admin and proxy routes join here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, jsonify
from quart_trio import QuartTrio

from eecp import __version__

if TYPE_CHECKING:
    from eecp.service import Services


def create_app(services: Services) -> QuartTrio:
    """Build the quart-trio app bound to one process's ``services``."""
    app = QuartTrio("eecp")
    app.config["JSON_SORT_KEYS"] = False

    @app.get("/health")
    async def health() -> tuple[Response, int]:
        return await health_response(services)

    return app


async def health_response(services: Services) -> tuple[Response, int]:
    """``{"status":"ok"}`` (200) when the store answers, ``degraded`` (503) otherwise."""
    store_ok = await services.store.ping()
    body: dict[str, Any] = {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "store": "ok" if store_ok else "unavailable",
        "store_backend": services.store.describe().split(":", 1)[0],
        "dev_root_ca": services.dev_root_ca,
        "networks": {n.name: "sealed" if n.sealed else "open" for n in services.config.networks},
    }
    if services.dev_root_ca:
        body["warning"] = "EE_DCAP_ROOT_CA replaces Intel's root: development only"
    return jsonify(body), 200 if store_ok else 503

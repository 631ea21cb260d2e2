"""eecp-agent: the tunnel client that runs inside a TDX VM (issue 3 §5).

It dials OUT to eecp (``GET /v1/tunnel``), registers its app, answers attestation challenges
with TDX quotes and reports its backend's health; see :mod:`agent.tunnel`. It shares
:mod:`eecp.wire.protocol` and :mod:`eecp.wire.measurements` with the control plane, so the
messages it sends and the report_data it asks its TD to quote are built by the same code
eecp checks them with.

Modules: :mod:`agent.agent` (entry point), :mod:`agent.config` (``EE_*`` variables),
:mod:`agent.measure` (measurements), :mod:`agent.providers` (configfs-tsm and dev quotes),
:mod:`agent.health` (backend probe), :mod:`agent.tunnel` (the connection loop).
"""

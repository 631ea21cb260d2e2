#!/usr/bin/env python3
"""eecp-agent: the tunnel client that runs inside a TDX VM.

Run it as ``eecp-agent`` (console script) or ``python agent/agent.py``; it is configured by
environment variables (see :mod:`agent.config`). It measures itself, then keeps a tunnel to
eecp open until it receives SIGINT or SIGTERM. A configuration error prints one line naming
the variable and exits with status 2.

This file is the agent's "main file": its SHA-256 is the ``agent_py_sha256`` measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as `python agent/agent.py`: sys.path[0] is agent/ itself, where `import agent` would
    # find this very file instead of the package. Put the repository root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import gc
import logging
import os
import signal
from collections.abc import Mapping

import trio

from agent.config import AgentConfig, from_env
from agent.measure import measure
from agent.providers import ConfigfsTsmProvider, DevQuoteProvider, QuoteProvider
from agent.tunnel import CLOSE_TIMEOUT_SEC, DEV_PROVIDER_HINT, run_agent
from eecp.core.errors import ConfigError
from eecp.core.logs import setup_logging
from eecp.patches import wsproto as wsproto_speedups
from eecp.wire.measurements import Measurements

log = logging.getLogger("agent")

#: how long a graceful stop may take (closing the tunnel) before everything is cancelled
STOP_GRACE_SEC = CLOSE_TIMEOUT_SEC + 1.0


def build_provider(config: AgentConfig) -> QuoteProvider:
    """The quote provider ``EE_QUOTE_PROVIDER`` names (the dev PKI is created if missing)."""
    if config.quote_provider == "dev":
        try:
            return DevQuoteProvider(config.dev_pki_dir, mrtd=config.dev_mrtd,
                                    rtmrs=config.dev_rtmrs, fmspc=config.dev_fmspc)
        except (OSError, ValueError) as exc:
            raise ConfigError("EE_DEV_PKI_DIR", f"{config.dev_pki_dir}: {exc}") from None
    return ConfigfsTsmProvider(config.tsm_report_dir)


def _announce(config: AgentConfig, provider: QuoteProvider, measurements: Measurements) -> None:
    for warning in config.warnings:
        log.warning("%s", warning)
    log.info("agent %s for %s (%s@%s on %s); measurements agent_dir=%s agent_py=%s "
             "vm_image_id=%r sealed=%s", config.agent_id, config.app_name, config.repo,
             config.release_tag, config.network, measurements.agent_dir_sha256,
             measurements.agent_py_sha256, measurements.vm_image_id, measurements.sealed)
    if isinstance(provider, DevQuoteProvider):
        log.warning("EE_QUOTE_PROVIDER=dev: quotes are signed by the development PKI in %s, "
                    "not by a TDX module; eecp accepts them only with EE_DCAP_ROOT_CA=%s",
                    provider.pki_dir, provider.root_pem_path)
    elif isinstance(provider, ConfigfsTsmProvider) and not provider.available():
        log.error("configfs-tsm is not available at %s: challenges cannot be answered "
                  "(is this a TDX guest?); %s", provider.base, DEV_PROVIDER_HINT)


async def _serve(config: AgentConfig, provider: QuoteProvider,
                 measurements: Measurements) -> None:
    """Run the agent until SIGINT/SIGTERM; then close the tunnel gracefully and return."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop, nursery.cancel_scope)
        await run_agent(config, provider, measurements, stop=stop)
        nursery.cancel_scope.cancel()  # the agent is done: stop listening for signals


async def _stop_on_signal(stop: trio.Event, scope: trio.CancelScope) -> None:
    """First signal: ask the agent to stop, within a grace period. Second: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            if stop.is_set():
                scope.cancel()
                return
            stop.set()
            scope.deadline = min(scope.deadline, trio.current_time() + STOP_GRACE_SEC)


def run(env: Mapping[str, str]) -> int:
    """Configure from ``env``, measure, and run until a signal; the process exit status."""
    try:
        config = from_env(env)
        measurements = measure(config)
        provider = build_provider(config)
    except ConfigError as exc:
        print(f"eecp-agent: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    # once, at the process's start: an agent masks every byte it sends, in C, not in Python
    wsproto_speedups.install()
    _announce(config, provider, measurements)
    gc.freeze()  # start-up's objects out of the collector's sight: see eecp.cli.serve_command
    trio.run(_serve, config, provider, measurements)
    return 0


def main() -> int:
    """Entry point of the ``eecp-agent`` console script and of ``python agent/agent.py``."""
    return run(os.environ)


if __name__ == "__main__":
    sys.exit(main())

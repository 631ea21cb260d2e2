"""The ``eecp`` command: ``eecp serve``, ``eecp verify-quote``, ``eecp demo`` and
``eecp release-agent``.

Configuration errors print one line naming the variable and exit with status 2. The commands
that run the control plane (``serve``, ``demo``) apply the library patches once, at start
(:func:`eecp.patches.apply_all`), after logging is set up so that their versions are logged.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from eecp import __version__
from eecp.attestation import verify_cli as verify_quote
from eecp.core.config import from_env
from eecp.core.errors import ConfigError, StoreError
from eecp.core.logs import setup_logging
from eecp.patches import apply_all as apply_patches


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="eecp", description="Easy Enclave Control Plane")
    parser.add_argument("--version", action="version", version=f"eecp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the control plane (configured by EE_* variables)")
    verify = sub.add_parser("verify-quote", help="verify a DCAP quote and judge it by policy")
    verify_quote.add_arguments(verify)
    release = sub.add_parser(
        "release-agent", help="delete an (offline) agent's row, and with it the binding of its "
        "agent_id to its app and repo (the store EE_DB_URL/EE_DB_PATH names)")
    release.add_argument("agent_id", help="the agent's id (a UUID)")
    demo = sub.add_parser("demo", help="run eecp, a dev-PKI agent and a tiny app on loopback")
    demo.add_argument("--dir", default="data/demo", help="where the demo keeps its files")
    demo.add_argument("--ledger", action="store_true",
                      help="with the USD ledger on: a funded user, a node owning the agent's "
                           "platform, 60-second periods, and the curl commands to settle usage")
    demo.add_argument("--slash", action="store_true",
                      help="the ledger demo (implies --ledger), cutting the agent's tunnel "
                           "for 30 s once set up, so that the premium demo node is slashed")
    for name, default in (("control", 8088), ("proxy", 9090), ("auth", 8089)):
        demo.add_argument(f"--{name}-port", type=int, default=default, metavar="PORT",
                          help=f"loopback port of the {name} listener (0: any free port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eecp`` console script."""
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    if args.command == "verify-quote":
        # the tool speaks through its report and its one error line; library warnings (a PCCS
        # that did not answer, ...) would only repeat them
        logging.getLogger().addHandler(logging.NullHandler())
        return verify_quote.run(args, env)
    if args.command == "demo":
        return demo_command(args, env)
    if args.command == "release-agent":
        return release_agent_command(args.agent_id, env)
    return serve_command(env)


def serve_command(env: dict[str, str]) -> int:
    """``eecp serve``: build the config, set up logging, run until a signal."""
    from eecp.ledger.answers import LedgerSettings
    from eecp.service import serve

    try:
        config = from_env(env)
        if config.ledger_enabled:  # the ledger's own grammars too, before anything starts
            LedgerSettings.from_config(config)
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    apply_patches()
    # What start-up made (modules, libraries) lives as long as the process: out of the cyclic
    # collector's sight, a full collection scans what requests make, ~2 ms instead of 15-25 ms
    # stalls that every request in flight would wait out (bench/RESULTS.md, the c=64 p99)
    gc.freeze()
    try:
        trio.run(serve, config)
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"eecp: store error: {exc}", file=sys.stderr)
        return 1
    return 0


def release_agent_command(agent_id: str, env: dict[str, str]) -> int:
    """``eecp release-agent``: the id may then be admitted for any app (its audit history
    stays). Meant for an agent that is offline: a connected one writes its row again."""
    from eecp.core.blocking import Workers
    from eecp.store.records import AgentRecord
    from eecp.store.store import open_store

    try:
        config = from_env(env)
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2

    async def release() -> AgentRecord | None:
        async with open_store(config, Workers(store=1)) as store:
            record = await store.get_agent(agent_id)
            if record is not None:
                await store.release_agent(agent_id)
            return record

    try:
        record = trio.run(release)
    except StoreError as exc:
        print(f"eecp: store error: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"eecp: no agent {agent_id!r} in the store", file=sys.stderr)
        return 1
    print(f"released agent {agent_id} (bound to app {record.app_name}, repo {record.repo})")
    return 0


def demo_command(args: argparse.Namespace, env: dict[str, str]) -> int:
    """``eecp demo``: print the URLs to try once the agent is attested; run until a signal."""
    from eecp.dev.demo import DemoError, DemoSettings, serve_demo

    try:
        # only the log settings are taken from the environment (validated as `serve` does)
        logging_config = from_env({k: v for k, v in env.items()
                                   if k in ("EE_LOG_FORMAT", "EE_LOG_LEVEL")})
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    settings = DemoSettings(Path(args.dir), args.control_port, args.proxy_port, args.auth_port,
                            logging_config.log_format, logging_config.log_level,
                            ledger=args.ledger or args.slash, slash=args.slash)
    setup_logging(settings.log_format, settings.log_level)
    apply_patches()  # (the demo's agent runs in this process too: it gets the wsproto one)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve_demo, settings)
            print("\n".join(urls.lines()), flush=True)

    failures: list[BaseException] = []
    try:
        trio.run(run)
    except* (DemoError, OSError) as group:  # not attested; a port in use, an unwritable --dir
        failures.extend(group.exceptions)
    for failure in failures[:1]:
        print(f"eecp demo: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

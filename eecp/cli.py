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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import trio

from eecp import __version__
from eecp.attestation import verify_cli as verify_quote
from eecp.core.config import from_env
from eecp.core.errors import ConfigError, EecpError, StartupError, StoreError
from eecp.core.logs import setup_logging
from eecp.patches import apply_all as apply_patches


class UsageError(Exception):
    """A command line argparse cannot use; :func:`main` reports it (as JSON for
    ``verify-quote --json``)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, raising :class:`UsageError` instead of printing and exiting on its own."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="eecp", description="Easy Enclave Control Plane")
    parser.add_argument("--version", action="version", version=f"eecp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the control plane (configured by EE_* variables)",
                   description="Run the control plane until SIGINT/SIGTERM. It takes no "
                   "options:\neverything is configured by EE_* environment variables, read "
                   "once at start-up\n(a bad value: one line naming it, exit status 2).",
                   epilog=serve_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
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


#: the variables ``eecp serve --help`` shows (README's "Configuration" has every one)
SERVE_HELP_VARIABLES = (
    ("EE_CONTROL_BIND", "control_bind", "the control port's address (API, tunnel, health)"),
    ("EE_CONTROL_PORT", "control_port", "control port"),
    ("EE_PROXY_BIND", "proxy_bind", "the proxy listener's address"),
    ("EE_PROXY_PORT", "proxy_port", "proxy listener port"),
    ("EE_AUTH_BIND", "auth_bind", "the auth listener's address (resolve)"),
    ("EE_AUTH_PORT", "auth_port", "auth listener port"),
    ("EE_DB_PATH", "db_path", "the SQLite file"),
    ("EE_DB_URL", "db_url", "postgresql://user:pass@host/db selects PostgreSQL"),
    ("EE_ADMIN_TOKEN", "admin_token", "the admin endpoints' bearer token (unset: open)"),
    ("EE_PCCS_URL", "pccs_url", "the PCCS/PCS serving collateral"),
    ("EE_ALLOWLIST_DIR", "allowlist_dir", "local allowlists instead of GitHub releases"),
    ("EE_LEDGER_ENABLED", "ledger_enabled", "true: the USD ledger (needs EE_ADMIN_TOKEN)"),
    ("EE_LOG_FORMAT", "log_format", "text or json"),
    ("EE_LOG_LEVEL", "log_level", "DEBUG, INFO, WARNING, ERROR"),
)


def serve_epilog() -> str:
    """The most important variables with their defaults (taken from :class:`Config` itself,
    so that the help cannot drift from the code), and where the rest are."""
    defaults = from_env({})
    rows = []
    for variable, attribute, meaning in SERVE_HELP_VARIABLES:
        value = getattr(defaults, attribute)
        shown = "unset" if value is None else str(value).lower() if isinstance(value, bool) \
            else str(value)
        rows.append(f"  {variable:<18} {meaning} (default: {shown})")
    return "\n".join([
        "The most important variables:", *rows, "",
        "Every variable, with its default and meaning, is in the \"Configuration\" section of",
        "README.md (in the source tree, or the package's description).",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eecp`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        if argv[:1] == ["verify-quote"] and "--json" in argv:
            return verify_quote.report_error("usage", exc.message, as_json=True)
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
        return 2
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
    except BaseException as exc:  # re-raised unless a start-up failure
        return report_startup_failure(exc, "eecp")
    return 0


#: what stops eecp from starting (a bug is none of these: it keeps its traceback)
STARTUP_FAILURES: tuple[type[EecpError], ...] = (ConfigError, StartupError, StoreError)


def startup_failures(exc: BaseException, kinds: tuple[type[EecpError], ...] = STARTUP_FAILURES
                     ) -> list[EecpError] | None:
    """The start-up failures ``exc`` is made of, in order — None unless it is made of nothing
    else. Trio's nurseries wrap a failure in groups, nested as deep as the tasks that raised
    it; a group that holds anything else as well (a bug, a KeyboardInterrupt) is no start-up
    failure, and is to be raised as it is."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[EecpError] = []
        for member in exc.exceptions:
            inner = startup_failures(member, kinds)
            if inner is None:
                return None
            found.extend(inner)
        return found
    return [exc] if isinstance(exc, kinds) else None


def report_startup_failure(exc: BaseException, prog: str,
                           kinds: tuple[type[EecpError], ...] = STARTUP_FAILURES,
                           rename: Mapping[str, str] | None = None) -> int:
    """Print a start-up failure as one line (the first, if several listeners failed at once)
    and return the exit status: 2 for a configuration error, else 1. Anything else is
    re-raised, traceback and all. ``rename`` replaces variable names in the line (the demo's
    options set what ``serve`` knows as variables)."""
    failures = startup_failures(exc, kinds)
    if not failures:
        raise exc
    first = next((f for f in failures if isinstance(f, ConfigError)), failures[0])
    if isinstance(first, ConfigError):
        print(f"{prog}: configuration error: {first.detail}", file=sys.stderr)
        return 2
    line = first.detail or first.reason
    for variable, option in (rename or {}).items():
        line = line.replace(f"({variable})", f"({option})").replace(f", {variable})",
                                                                      f", {option})")
    print(f"{prog}: {line}", file=sys.stderr)
    return 1


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

    try:
        trio.run(run)
    except BaseException as exc:  # re-raised unless a start-up failure
        # not attested, a port in use, an unusable --dir: one line, naming the demo's option
        return report_startup_failure(exc, "eecp demo", (*STARTUP_FAILURES, DemoError),
                                      DEMO_OPTIONS)
    return 0


#: the demo's options, which set what eecp's start-up failures name as variables
DEMO_OPTIONS = {"EE_CONTROL_PORT": "--control-port", "EE_PROXY_PORT": "--proxy-port",
                "EE_AUTH_PORT": "--auth-port", "EE_DB_PATH": "--dir"}


if __name__ == "__main__":
    sys.exit(main())

"""The ``eecp`` command: ``eecp serve`` and ``eecp verify-quote``.

Configuration errors print one line naming the variable and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import trio

from eecp import __version__, verify_quote
from eecp.config import from_env
from eecp.errors import ConfigError, StoreError
from eecp.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="eecp", description="Easy Enclave Control Plane")
    parser.add_argument("--version", action="version", version=f"eecp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the control plane (configured by EE_* variables)")
    verify = sub.add_parser("verify-quote", help="verify a DCAP quote and judge it by policy")
    verify_quote.add_arguments(verify)
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
    return serve_command(env)


def serve_command(env: dict[str, str]) -> int:
    """``eecp serve``: build the config, set up logging, run until a signal."""
    from eecp.service import serve

    try:
        config = from_env(env)
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    try:
        trio.run(serve, config)
    except ConfigError as exc:
        print(f"eecp: configuration error: {exc.detail}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"eecp: store error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

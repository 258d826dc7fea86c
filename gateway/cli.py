"""The ``upload-gateway`` command: wiring only; each command lives in ``gateway/commands/``."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

# In the order ``--help`` lists them.
COMMAND_MODULES = (
    "serve",
    "check_config",
    "keys",
    "secret",
    "explain",
    "sample_backend",
)
DEFAULT_CONFIG = "config/policies.yaml"


def default_config_path() -> str:
    return os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upload-gateway",
        description="Authenticating, inspecting reverse proxy for uploads.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="policies file (default $GATEWAY_CONFIG or " + DEFAULT_CONFIG + ")",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gateway.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        args.config = default_config_path()
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # ``keys list | head -1``: the reader left, which is no error of ours to trace back.
        # Python's recipe: stdout to /dev/null, so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return result

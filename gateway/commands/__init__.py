"""One module per CLI command; each exposes ``register(subparsers)`` and sets ``func``."""

from __future__ import annotations

import argparse


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config`` is accepted after the command too (``serve --config FILE``, SPEC §2)."""
    parser.add_argument("--config", default=argparse.SUPPRESS, help="policies file")

"""``upload-gateway sample-backend``: a real backend to put behind the gateway."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.commands import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sample-backend", help="run a small backend that stores uploads")
    add_config_argument(p)
    p.add_argument("--listen", default="127.0.0.1:8081", help="host:port (default 127.0.0.1:8081)")
    p.add_argument("--store", default="var/backend-files", help="folder for received files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gateway.sample_backend import run_sample_backend

    host, _, port = args.listen.rpartition(":")
    run_sample_backend(host or "127.0.0.1", int(port), Path(args.store))
    return 0

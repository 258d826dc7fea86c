"""``upload-gateway sample-backend``: a real backend to put behind the gateway.

``make run`` prints the end of this command's output when it did not start, so a port in use
is one line and exit 1, and a ``--listen`` that is not ``host:port`` a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.commands import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sample-backend", help="run a small backend that stores uploads")
    add_config_argument(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:8081",
        type=_host_port,
        help="host:port (default 127.0.0.1:8081)",
    )
    p.add_argument("--store", default="var/backend-files", help="folder for received files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gateway.sample_backend import run_sample_backend

    host, port = args.listen
    store = Path(args.store)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot make --store {store}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        run_sample_backend(host, port, store)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port such as 127.0.0.1:8081, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)

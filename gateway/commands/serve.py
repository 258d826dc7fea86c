"""``upload-gateway serve --config FILE [--workers N]``."""

from __future__ import annotations

import argparse
import signal

from gateway.commands import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the proxy")
    add_config_argument(p)
    p.add_argument(
        "--workers", type=_workers, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    p.set_defaults(func=run)


def _workers(text: str) -> int:
    """At least one: ``--workers 0`` quietly ran one, which is not what was asked for."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {count}")
    return count


def run(args: argparse.Namespace) -> int:
    # Until a worker's event loop handles SIGHUP (reload), its default action would kill the
    # process: ignore it from here, before the heavy imports. The configuration is read after
    # this point, and the file watcher catches any later change.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from gateway.server import serve

    return serve(args.config, args.workers)

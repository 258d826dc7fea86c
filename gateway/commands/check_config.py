"""``upload-gateway check-config FILE``: validate a policies file before it goes live (SPEC §2).

Exit 0 with ``OK: FILE`` and a short summary, or exit 1 with every error as ``FILE:LINE: key:
message`` on stderr, so CI can gate a policy change. Signing secrets are not required here (the
machine checking a file rarely holds them); a missing one is mentioned in the summary instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.commands import add_config_argument
from gateway.config import Config, ConfigError, format_size, load_config
from gateway.redis_client import display_url


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("check-config", help="validate a policies file; exit 1 on errors")
    p.add_argument("file", nargs="?", default=None, help="policies file (default: --config)")
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path: str = args.file or args.config
    try:
        config = load_config(path, require_secrets=False)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        count = len(exc.errors)
        print(f"{path}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    print(f"OK: {path}")
    for line in summary(config):
        print(f"  {line}")
    return 0


def summary(config: Config) -> list[str]:
    """What an operator wants to eyeball after a change: where it listens, and the policy."""
    lines = [
        f"listen {config.listen}, admin {config.admin_listen}, mode {config.mode}",
        f"backend {display_url(config.backend.url)}, redis {display_url(config.redis.url)}",
    ]
    for kid, key in config.auth.keys.items():
        if key.public_key_file is not None:
            lines.append(f"key {kid}: public key {key.public_key_file}")
        else:
            state = "set" if key.secret is not None else "not set; serve needs it"
            lines.append(f"key {kid}: secret from ${key.secret_env} ({state})")
    lines.append(f"routes ({len(config.uploads.routes)}):")
    lines += [f"  {','.join(r.methods)} {r.path}" for r in config.uploads.routes]
    cap = format_size(config.limits.max_file_size)
    lines.append(f"channels ({len(config.channels)}), max_file_size {cap}:")
    for name, channel in config.channels.items():
        for role in ("agent", "customer"):
            policy = channel.for_role(role)
            rule = (
                f"{format_size(policy.max_file_size)}, {', '.join(policy.allowed_types) or '-'}"
                if policy.enabled
                else "disabled"
            )
            lines.append(f"  {name}/{role}: {rule}")
    return lines

"""``upload-gateway keys add|rotate|revoke|list|purge`` (SPEC §2): manage the active-key set.

The API key is printed once, by ``add``/``rotate``, and never again: Redis holds only its digest,
so ``list`` can show ids, clients and dates but cannot show a key even if asked. Exit status: 0 on
success, 1 when the config, Redis or the named key is the problem, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from gateway.auth.keystore import KeyRecord, KeyStore, NewKey
from gateway.auth.ratelimit import RateLimit
from gateway.commands import add_config_argument
from gateway.config.loader import load_config
from gateway.config.reader import ConfigError
from gateway.config.units import parse_duration
from gateway.redis_client import REDIS_ERRORS, build_redis, display_url

DEFAULT_TTL = "90d"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys in the active-key set")
    add_config_argument(parser)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="create a key; prints it once")
    _key_options(add)
    add.set_defaults(func=run, handler=_add)

    rotate = actions.add_parser(
        "rotate",
        help="new key (keeping the client's allow-list and rate limit unless given); "
        "the client's old keys end after --overlap",
    )
    _key_options(rotate)
    rotate.add_argument(
        "--overlap",
        type=_duration,
        default=7 * 86400.0,
        help="how long the old keys keep working (default 7d)",
    )
    rotate.set_defaults(func=run, handler=_rotate)

    revoke = actions.add_parser("revoke", help="make a key inactive on every replica at once")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=run, handler=_revoke)

    listing = actions.add_parser("list", help="ids, clients, dates and states; never the keys")
    listing.add_argument("--client", help="only this client's keys")
    listing.set_defaults(func=run, handler=_list)

    purge = actions.add_parser("purge", help="remove expired keys (also done automatically)")
    purge.set_defaults(func=run, handler=_purge)

    for sub in (add, rotate, revoke, listing, purge):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        add_config_argument(sub)


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", required=True, help="the client (tenant) id the key belongs to")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--expires", type=_date, help="expiry: ISO date or datetime (UTC if no zone)")
    when.add_argument(
        "--ttl", type=_ttl, help=f"lifetime, e.g. 90d, or 'never' (default {DEFAULT_TTL})"
    )
    parser.add_argument("--label", default="", help="free text shown by `keys list`")
    parser.add_argument(
        "--allow-ip",
        action="append",
        default=[],
        type=_cidr,
        metavar="CIDR",
        help="only these client addresses may use the key (repeatable)",
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate,
        metavar="N/WINDOW",
        help="per-client limit counted across all replicas, e.g. 100/60s",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, require_secrets=False)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    handler: Callable[[KeyStore, argparse.Namespace], Awaitable[int]] = args.handler

    async def main() -> int:
        redis = build_redis(config.redis, client_name="upload-gateway-keys")
        try:
            return await handler(KeyStore(redis, config.redis.key_prefix), args)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except REDIS_ERRORS as exc:
        print(f"error: Redis at {display_url(config.redis.url)} failed: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# -- actions ----------------------------------------------------------------------------------


async def _add(store: KeyStore, args: argparse.Namespace) -> int:
    new = await store.add(
        args.client,
        _expiry(args),
        label=args.label,
        allow_ips=args.allow_ip,
        rate_limit=args.rate_limit,
    )
    _print_new(new, args.json)
    return 0


async def _rotate(store: KeyStore, args: argparse.Namespace) -> int:
    new, ended = await store.rotate(
        args.client,
        args.overlap,
        _expiry(args),
        label=args.label,
        allow_ips=args.allow_ip,
        rate_limit=args.rate_limit,
    )
    old = [{"key_id": r.key_id, "expires": _iso(r.expires)} for r in ended]
    _print_new(new, args.json, {"old_keys": old})
    if not args.json:
        for item in old:
            print(f"old key {item['key_id']} now expires {item['expires']}")
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    record = await store.revoke(args.key_id)
    if record is None:
        print(f"error: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"key_id": args.key_id, "client": record.client, "revoked": True}))
    else:
        print(f"revoked {args.key_id} (client {record.client})")
    return 0


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    now = time.time()
    rows = [_row(r, now) for r in await store.list(args.client)]
    if args.json:
        print(json.dumps(rows))
        return 0
    columns = ("key_id", "client", "label", "created", "expires", "state")
    table = [[c.upper() for c in columns]] + [[str(row[c] or "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


async def _purge(store: KeyStore, args: argparse.Namespace) -> int:
    purged = await store.purge()
    print(json.dumps({"purged": purged}) if args.json else f"purged {purged} expired key(s)")
    return 0


# -- formatting -------------------------------------------------------------------------------


def _print_new(new: NewKey, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    record, api_key = new.record, new.api_key.reveal().decode()
    if as_json:
        out = {
            "key_id": record.key_id,
            "client": record.client,
            "api_key": api_key,
            "expires": _iso(record.expires),
            **(extra or {}),
        }
        print(json.dumps(out))
        return
    print(f"key_id:  {record.key_id}")
    print(f"client:  {record.client}")
    print(f"expires: {_iso(record.expires) or 'never'}")
    print(f"api_key: {api_key}")
    print("The API key is shown only now; Redis keeps only its digest.", file=sys.stderr)


def _row(record: KeyRecord, now: float) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "client": record.client,
        "label": record.label,
        "created": _iso(record.created),
        "expires": _iso(record.expires),
        "state": record.state(now),
        "allow_ips": list(record.allow_ips),
        "rate_limit": str(record.rate_limit) if record.rate_limit else None,
    }


def _iso(epoch: float) -> str | None:
    if math.isinf(epoch):
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- argument types ---------------------------------------------------------------------------


def _expiry(args: argparse.Namespace) -> float:
    """When the new key ends; never already over (a mistyped year would print a dead key and,
    with ``rotate``, still put an end date on the client's working keys)."""
    if args.expires is not None:
        expires: float = args.expires
    else:
        ttl: float = args.ttl if args.ttl is not None else parse_duration(DEFAULT_TTL)
        expires = time.time() + ttl
    if expires <= time.time():
        raise ValueError(f"the new key would be expired already ({_iso(expires)}): nothing changed")
    return expires


def _date(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2026-12-31, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _ttl(text: str) -> float:
    return math.inf if text.strip().lower() == "never" else _duration(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address or CIDR, got {text!r}") from None


def _rate(text: str) -> RateLimit:
    try:
        return RateLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

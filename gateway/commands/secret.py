"""``upload-gateway secret mint``: sign a Secret the way the platform would (SPEC §2, §3).

For demos, tests and operators checking a key end to end. stdout carries the token and nothing
else, so ``TOKEN=$(upload-gateway secret mint --api-key ...)`` works; everything else goes to
stderr. HS keys come from the config (``GATEWAY_SIGNING_KEY`` for kid ``default``); the gateway only
holds public keys for RS/ES, so those need ``--private-key-file``, checked against the configured
public key so a Secret that this gateway would refuse is never printed. ``--api-key -`` reads the
key from stdin, which keeps it out of the process list.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.auth.secret import (
    API_KEY_CLAIM,
    DEFAULT_KID,
    key_family,
    mint,
    private_key_family,
    signing_algorithm,
)
from gateway.commands import add_config_argument
from gateway.config.loader import load_config
from gateway.config.model import AuthConfig, SigningKey
from gateway.config.reader import ConfigError
from gateway.config.units import parse_duration

RESERVED = (API_KEY_CLAIM, "exp", "iat")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("secret", help="sign Secrets (JWTs carrying an API key)")
    add_config_argument(parser)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = actions.add_parser("mint", help="print a signed Secret for an API key, and nothing else")
    m.add_argument("--api-key", required=True, help="the API key to carry ('-': read stdin)")
    m.add_argument("--ttl", type=_duration, default=86400.0, help="lifetime (default 24h)")
    m.add_argument(
        "--claim",
        action="append",
        default=[],
        type=_claim,
        metavar="NAME=VALUE",
        help="extra claim; VALUE is JSON if it parses (true, 3), else a string",
    )
    m.add_argument("--kid", default=DEFAULT_KID, help="signing key id (default 'default')")
    m.add_argument("--private-key-file", help="PEM private key, for RS/ES keys")
    add_config_argument(m)
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, require_secrets=False)
        key, algorithm = _signing_key(config.auth, args.kid, args.private_key_file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    api_key = sys.stdin.readline().strip() if args.api_key == "-" else args.api_key
    if not api_key:
        print("error: empty API key", file=sys.stderr)
        return 2
    claims = dict(args.claim)
    print(mint(api_key, key, algorithm, kid=args.kid, ttl=args.ttl, claims=claims))
    return 0


def _signing_key(auth: AuthConfig, kid: str, private_key_file: str | None) -> tuple[Any, str]:
    """The key and algorithm to sign with, such that this config's verifier accepts the result."""
    configured = auth.keys.get(kid)
    if configured is None:
        raise ValueError(f"auth.keys has no kid {kid!r} (known: {', '.join(auth.keys) or 'none'})")
    if private_key_file is None:
        if configured.secret is None:
            raise ValueError(f"kid {kid!r} has no shared secret to sign with: {_hint(configured)}")
        return configured.secret.reveal(), signing_algorithm("HS", auth.algorithms)
    with open(private_key_file, "rb") as handle:
        family, private = private_key_family(handle.read())
    if configured.public_key_pem is None:
        raise ValueError(f"kid {kid!r} is a shared-secret key; a private key file does not fit it")
    configured_family, public = key_family(configured)
    same = private.public_key().public_numbers() == public.public_numbers()
    if configured_family != family or not same:
        raise ValueError(f"{private_key_file} is not the private half of kid {kid!r}'s public key")
    return private, signing_algorithm(family, auth.algorithms, public)


def _hint(key: SigningKey) -> str:
    """What to do: the file usually names the variable already; it is the variable that is
    missing from this shell (``make run`` keeps the demo's in ``var/signing-key``)."""
    if key.public_key_pem:
        return "pass --private-key-file"
    if key.secret_env:
        return f"environment variable {key.secret_env} is not set"
    return "give it a secret_env"


def _claim(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name in RESERVED:
        raise argparse.ArgumentTypeError(f"{name!r} is set by mint itself")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name, value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

"""The ``auth`` section (SPEC §2, §3): algorithms, and the verification keys read at load time.

Key material is read here, not per request, so a missing variable, an unreadable PEM or a key that
fits none of the configured algorithms ("never an algorithm the key type does not fit", SPEC §3)
stops the gateway at start (or a reload) instead of failing every request.
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from yaml.nodes import Node

from gateway.config.model import AuthConfig, SecretValue, SigningKey
from gateway.config.reader import Reader, join

ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
"""The only JWT algorithms a config may name (SPEC §3): never ``none``, nothing exotic."""

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_EC_CURVE_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384"}


def read_auth(reader: Reader, node: Node, key: str, require_secrets: bool) -> AuthConfig | None:
    found = reader.mapping(
        node, key, ("header", "algorithms", "keys", "leeway", "cache_ttl", "retry_after")
    )
    if found is None:
        return None
    auth, usable = AuthConfig(), AuthConfig().algorithms
    if "algorithms" in found:
        before = len(reader.issues)
        algs = _algorithms(reader, found["algorithms"], join(key, "algorithms"))
        auth = replace(auth, algorithms=algs or auth.algorithms)
        # With a bad algorithm list, check keys against all of them: one mistake, one message.
        usable = auth.algorithms if len(reader.issues) == before else ALGORITHMS
    fields = reader.read_fields(
        found,
        key,
        {
            "header": lambda n, k: _header_name(reader, n, k),
            "leeway": reader.duration,
            "cache_ttl": reader.duration,
            "retry_after": lambda n, k: reader.integer(n, k, minimum=0),
        },
    )
    auth = replace(auth, **fields)
    if "keys" in found:
        keys_key = join(key, "keys")
        entries = reader.mapping(found["keys"], keys_key, None) or {}
        read = {
            kid: _signing_key(reader, kid, knode, join(keys_key, kid), usable, require_secrets)
            for kid, knode in entries.items()
        }
        auth = replace(auth, keys=MappingProxyType({k: v for k, v in read.items() if v}))
    return auth


def _header_name(reader: Reader, node: Node, key: str) -> str | None:
    name = reader.string(node, key)
    if name is not None and not _HEADER_NAME.match(name):
        reader.error(node, key, f"{name!r} is not a valid HTTP header name")
        return None
    return name


def _algorithms(reader: Reader, node: Node, key: str) -> tuple[str, ...] | None:
    entries = reader.strings(node, key)
    if entries is None:
        return None
    chosen: list[str] = []
    for i, (name, item) in enumerate(entries):
        if name.upper() not in ALGORITHMS:
            why = "is never allowed" if name.lower() == "none" else "is not supported"
            reader.error(item, f"{key}[{i}]", f"{name!r} {why} (allowed: {', '.join(ALGORITHMS)})")
        elif name.upper() not in chosen:
            chosen.append(name.upper())
    if not entries:
        reader.error(node, key, "at least one algorithm is required")
    return tuple(chosen) or None


def _read_public_key(
    reader: Reader, path: str, node: Node, key: str, algs: tuple[str, ...]
) -> bytes | None:
    """Read a PEM public key now, so a wrong or mismatched key fails at load, not per request."""
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
        public_key = load_pem_public_key(pem)
    except (OSError, ValueError) as exc:
        reader.error(node, key, f"cannot load a PEM public key from {path!r}: {exc}")
        return None
    if isinstance(public_key, rsa.RSAPublicKey):
        fits, kind = [a for a in algs if a[:2] in ("RS", "PS")], "an RSA key (RS*/PS*)"
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        curve_alg = _EC_CURVE_ALGORITHM.get(public_key.curve.name)
        fits, kind = [a for a in algs if a == curve_alg], f"an EC {public_key.curve.name} key"
    else:
        fits, kind = [], f"a {type(public_key).__name__}"
    if not fits:
        reader.error(node, key, f"{kind} fits none of auth.algorithms ({', '.join(algs)})")
        return None
    return pem


# deploy/kubernetes/secret.yaml ships this value, to be replaced before deploying.
PLACEHOLDER_PREFIX = "REPLACE-ME"
_PLACEHOLDER_ERROR = (
    "holds the placeholder of deploy/kubernetes/secret.yaml: set the platform's signing key"
)


def is_placeholder(secret: str) -> bool:
    """A shared secret still the shipped placeholder: anyone who read the manifest could sign
    Secrets with it (each still needs an active key from Redis, but one safeguard would be
    gone), so the gateway refuses to start rather than run on it."""
    return secret.strip().upper().startswith(PLACEHOLDER_PREFIX)


def _signing_key(
    reader: Reader, kid: str, node: Node, key: str, algs: tuple[str, ...], require_secrets: bool
) -> SigningKey | None:
    """One ``auth.keys`` entry: exactly one of ``secret_env`` / ``public_key_file``."""
    found = reader.mapping(node, key, ("secret_env", "public_key_file"))
    if found is None:
        return None
    if len(found) != 1:
        reader.error(reader.owner(node), key, "needs exactly one of secret_env or public_key_file")
        return None
    ((name, vnode),) = found.items()
    value = reader.string(vnode, join(key, name))
    if value is None:
        return None
    if name == "public_key_file":
        pem = _read_public_key(reader, value, vnode, join(key, name), algs)
        return None if pem is None else SigningKey(kid, public_key_pem=pem, public_key_file=value)
    if not any(a.startswith("HS") for a in algs):
        reader.error(vnode, join(key, name), "a shared secret needs an HS* auth.algorithms entry")
        return None
    secret = reader.env.get(value)
    overridden = kid == "default" and bool(reader.env.get("GATEWAY_SIGNING_KEY"))
    if not secret and require_secrets and not overridden:
        reader.error(vnode, join(key, name), f"environment variable {value} is not set")
        return None
    if secret and is_placeholder(secret) and not overridden:  # else the override's check says it
        reader.error(vnode, join(key, name), f"{value} {_PLACEHOLDER_ERROR}")
        return None
    wrapped = SecretValue(secret.encode()) if secret else None
    return SigningKey(kid, secret=wrapped, secret_env=value)


def apply_signing_key_override(reader: Reader, auth: AuthConfig) -> AuthConfig:
    """``GATEWAY_SIGNING_KEY`` is the shared secret of kid ``default`` (created if absent)."""
    secret = reader.env.get("GATEWAY_SIGNING_KEY")
    if not secret:
        return auth
    if is_placeholder(secret):
        reader.error(None, "GATEWAY_SIGNING_KEY", f"GATEWAY_SIGNING_KEY {_PLACEHOLDER_ERROR}")
        return auth
    current = auth.keys.get("default")
    if current is not None and current.public_key_file is not None:
        reader.error(None, "GATEWAY_SIGNING_KEY", "kid 'default' is a public key, not a secret")
        return auth
    if not any(a.startswith("HS") for a in auth.algorithms):
        reader.error(None, "GATEWAY_SIGNING_KEY", "needs an HS* algorithm in auth.algorithms")
        return auth
    env_name = current.secret_env if current is not None else "GATEWAY_SIGNING_KEY"
    key = SigningKey("default", secret=SecretValue(secret.encode()), secret_env=env_name)
    return replace(auth, keys=MappingProxyType({**auth.keys, "default": key}))

"""The Secret: a JWT signed by the platform that carries the real API key (SPEC §3).

Verification is deliberately narrow, because every known JWT bypass comes from being generous:

* the key is chosen by the token's ``kid`` from the server's config only (never from a URL or key
  embedded in the token); a token without ``kid`` uses ``default``;
* each key accepts only the algorithms of its own family (HS for a shared secret, RS/PS for an RSA
  public key, ES for an EC public key) that are also allow-listed in ``auth.algorithms``. So an
  RS256 public key can never be used as an HS256 secret (algorithm confusion), and ``none`` is never
  accepted;
* ``exp`` is required (PyJWT accepts a token without it unless told otherwise); ``nbf``/``iat`` are
  honoured with ``auth.leeway``; ``client_secret`` must be a non-empty string.

This module does no I/O: garbage tokens are refused before anything touches Redis.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from gateway.config.model import AuthConfig, SecretValue, SigningKey
from gateway.errors import GatewayError

DEFAULT_KID = "default"
API_KEY_CLAIM = "client_secret"
VERIFIED_CACHE_SIZE = 4096  # Secrets remembered as verified, per process
FAMILIES: Mapping[str, tuple[str, ...]] = {
    "HS": ("HS256", "HS384", "HS512"),
    "RS": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "ES": ("ES256", "ES384", "ES512"),
}
# RFC 7518 §3.4: each ES algorithm is bound to one curve. PyJWT refuses a mismatch with
# InvalidKeyError, which is not an InvalidTokenError, so it must never reach jwt.decode.
EC_CURVE_ALGORITHM: Mapping[str, str] = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
}
# RFC 6750 §3: the challenge a client gets for a bad token (a missing one gets plain ``Bearer``).
INVALID_TOKEN_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
MISSING_TOKEN_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class VerifiedSecret:
    """What a valid Secret says. ``claims`` never holds ``client_secret``; the key is masked."""

    kid: str
    api_key: SecretValue = field(repr=False)
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class _Verified:
    secret: VerifiedSecret
    expires: float


@dataclass(frozen=True)
class _VerificationKey:
    key: Any  # bytes for HS, a cryptography public key object for RS/ES
    algorithms: tuple[str, ...]

    def __repr__(self) -> str:
        return f"_VerificationKey(algorithms={self.algorithms!r}, key='**********')"


def key_family(key: SigningKey) -> tuple[str, Any]:
    """The algorithm family a configured key can serve, and the key object PyJWT should get."""
    if key.secret is not None:
        return "HS", key.secret.reveal()
    if key.public_key_pem is not None:
        public = load_pem_public_key(key.public_key_pem)
        if isinstance(public, rsa.RSAPublicKey):
            return "RS", public
        if isinstance(public, ec.EllipticCurvePublicKey):
            return "ES", public
        raise ValueError(f"kid {key.kid!r}: only RSA and EC public keys are supported")
    raise ValueError(f"kid {key.kid!r} has neither a shared secret nor a public key")


def fitting_algorithms(family: str, key: Any, algorithms: tuple[str, ...]) -> tuple[str, ...]:
    """The allow-listed algorithms ``key`` can verify: its family's, and for EC its curve's only
    (a P-256 key with ``ES384`` in the list would otherwise turn a forged header into a 500)."""
    allowed = tuple(a for a in algorithms if a in FAMILIES[family])
    if family == "ES":
        allowed = tuple(a for a in allowed if a == EC_CURVE_ALGORITHM.get(key.curve.name))
    return allowed


def _invalid(detail: str, code: str = "invalid_secret") -> GatewayError:
    return GatewayError(code, detail, headers=INVALID_TOKEN_CHALLENGE)


class SecretVerifier:
    """Verifies Secrets against the configured keys; built once per config, then pure CPU."""

    def __init__(self, config: AuthConfig) -> None:
        self._leeway = config.leeway
        self._verified: dict[str, _Verified] = {}
        self._keys: dict[str, _VerificationKey] = {}
        for kid, signing_key in config.keys.items():
            family, key = key_family(signing_key)
            allowed = fitting_algorithms(family, key, config.algorithms)
            if allowed:  # a key with no allow-listed algorithm of its family can verify nothing
                self._keys[kid] = _VerificationKey(key, allowed)

    def verify(self, token: str) -> VerifiedSecret:
        """The Secret's key and claims, or GatewayError 401 (invalid_secret/expired_secret).

        A client sends the same Secret all day, so a verified one is remembered by its exact
        text: the same bytes under the same keys verify the same way, and of the time checks
        only ``exp`` can turn a valid Secret invalid later, so that one is re-checked on every
        use. Only successes are kept (a flood of forged tokens fills nothing), FIFO-bounded.
        """
        known = self._verified.get(token)
        if known is not None:
            if time.time() > known.expires + self._leeway:
                del self._verified[token]
                raise _invalid("the Secret has expired", "expired_secret")
            return known.secret
        secret = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(secret, float(secret.claims["exp"]))
        return secret

    def _verify(self, token: str) -> VerifiedSecret:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("the Secret is not a well-formed JWT") from None
        kid = header.get("kid", DEFAULT_KID)
        if not isinstance(kid, str) or kid not in self._keys:
            raise _invalid("the Secret names a signing key (kid) the gateway does not know")
        vkey = self._keys[kid]
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                vkey.key,
                algorithms=list(vkey.algorithms),
                options={"require": ["exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("the Secret has expired", "expired_secret") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("the Secret is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the Secret lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise _invalid("the Secret uses an algorithm its signing key does not allow") from None
        except jwt.PyJWTError:  # InvalidTokenError, and InvalidKeyError which is not one
            raise _invalid("the Secret's signature or claims could not be verified") from None
        api_key = claims.pop(API_KEY_CLAIM, None)
        if not isinstance(api_key, str) or not api_key:
            raise _invalid(f"the Secret lacks the {API_KEY_CLAIM!r} claim")
        try:
            raw_key = api_key.encode()  # JSON can carry a lone surrogate (\ud800); UTF-8 cannot
            float(claims["exp"])  # verify() keeps it as a float; PyJWT's int() takes 10**400
        except (UnicodeEncodeError, OverflowError):
            raise _invalid("the Secret's claims could not be verified") from None
        return VerifiedSecret(
            kid=kid, api_key=SecretValue(raw_key), claims=MappingProxyType(claims)
        )


def signing_algorithm(family: str, algorithms: tuple[str, ...], key: Any = None) -> str:
    """The first allow-listed algorithm that fits ``key`` (its curve, for EC), so minted Secrets
    verify with this config."""
    for algorithm in fitting_algorithms(family, key, algorithms):
        return algorithm
    raise ValueError(f"auth.algorithms {list(algorithms)} has no {family} algorithm to sign with")


def private_key_family(pem: bytes) -> tuple[str, Any]:
    """The family and key object of a PEM private key (for ``secret mint --private-key-file``)."""
    private = load_pem_private_key(pem, password=None)
    if isinstance(private, rsa.RSAPrivateKey):
        return "RS", private
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return "ES", private
    raise ValueError("only RSA and EC private keys can sign Secrets")


def mint(
    api_key: str,
    key: Any,
    algorithm: str,
    *,
    kid: str = DEFAULT_KID,
    ttl: float = 86400.0,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A Secret for ``api_key`` signed with ``key``; what the platform does when it issues one."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = dict(claims or {})
    payload.update({API_KEY_CLAIM: api_key, "iat": issued, "exp": issued + int(ttl)})
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})

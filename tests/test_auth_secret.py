"""The Secret's verification (SPEC §3): every way a JWT can be wrong is a 401, never a pass."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from types import MappingProxyType
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth.secret import SecretVerifier, VerifiedSecret, mint
from gateway.config.model import AuthConfig, SecretValue, SigningKey
from gateway.errors import GatewayError

HS_KEY = b"hs-test-key-0123456789abcdef0123456789"
API_KEY = "ugw_test-api-key"
RSA_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())


def _pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


RSA_PUBLIC_PEM = _pem(RSA_PRIVATE)
EC_PUBLIC_PEM = _pem(EC_PRIVATE)


def config(algorithms: tuple[str, ...] = ("HS256", "RS256", "ES256")) -> AuthConfig:
    return AuthConfig(
        algorithms=algorithms,
        keys=MappingProxyType(
            {
                "default": SigningKey("default", secret=SecretValue(HS_KEY)),
                "rsa-1": SigningKey("rsa-1", public_key_pem=RSA_PUBLIC_PEM),
                "ec-1": SigningKey("ec-1", public_key_pem=EC_PUBLIC_PEM),
            }
        ),
        leeway=2.0,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, the way an attacker would (PyJWT refuses to make these)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    signature = (
        b""
        if hmac_key is None
        else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    )
    return signing_input + "." + _b64(signature)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"client_secret": API_KEY, "iat": now, "exp": now + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def refused(
    token: str, code: str = "invalid_secret", cfg: AuthConfig | None = None
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        SecretVerifier(cfg or config()).verify(token)
    assert info.value.code == code
    assert info.value.status == 401
    assert info.value.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    assert API_KEY not in str(info.value)
    return info.value


def test_valid_hs256_secret_yields_key_and_claims_without_it() -> None:
    token = mint(API_KEY, HS_KEY, "HS256", claims={"role": "agent"})
    verified = SecretVerifier(config()).verify(token)
    assert verified.api_key.reveal().decode() == API_KEY
    assert verified.claims["role"] == "agent"
    assert "client_secret" not in verified.claims
    assert verified.kid == "default"
    assert API_KEY not in repr(verified)


def test_token_without_kid_uses_the_default_key() -> None:
    token = jwt.encode(claims(), HS_KEY, algorithm="HS256")
    assert isinstance(SecretVerifier(config()).verify(token), VerifiedSecret)


@pytest.mark.parametrize(
    "kid,private,algorithm", [("rsa-1", RSA_PRIVATE, "RS256"), ("ec-1", EC_PRIVATE, "ES256")]
)
def test_public_key_algorithms_selected_by_kid(kid: str, private: Any, algorithm: str) -> None:
    token = mint(API_KEY, private, algorithm, kid=kid)
    assert SecretVerifier(config()).verify(token).kid == kid


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 500])
def test_malformed_tokens(token: str) -> None:
    refused(token)


def test_wrong_signature() -> None:
    refused(mint(API_KEY, b"another-key-0123456789abcdef0123456789", "HS256"))


def test_alg_none_is_refused() -> None:
    refused(forge({"alg": "none", "typ": "JWT"}, claims(), None))
    refused(forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(), None))


def test_rs256_public_key_used_as_hs256_secret_is_refused() -> None:
    """Algorithm confusion: the attacker knows the public key and signs HS256 with it."""
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
        cfg = (
            config()
            if kid
            else AuthConfig(
                algorithms=("HS256", "RS256"),
                keys=MappingProxyType(
                    {"default": SigningKey("default", public_key_pem=RSA_PUBLIC_PEM)}
                ),
            )
        )
        refused(forge(header, claims(), RSA_PUBLIC_PEM), cfg=cfg)


# The forged HS512 token is signed with the suite's 38-byte HS256 key: PyJWT warns, rightly.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_algorithm_not_allow_listed_is_refused() -> None:
    refused(mint(API_KEY, HS_KEY, "HS512"))
    refused(mint(API_KEY, RSA_PRIVATE, "RS256", kid="rsa-1"), cfg=config(("HS256",)))


def test_unknown_kid() -> None:
    refused(mint(API_KEY, HS_KEY, "HS256", kid="rotated-away"))
    refused(forge({"alg": "HS256", "kid": 7}, claims(), HS_KEY))


def test_missing_exp() -> None:
    refused(jwt.encode(claims(exp=None), HS_KEY, algorithm="HS256"))


def test_expired_beyond_leeway() -> None:
    refused(
        jwt.encode(claims(exp=int(time.time()) - 10), HS_KEY, algorithm="HS256"),
        code="expired_secret",
    )


def test_expired_within_leeway_still_passes() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 1), HS_KEY, algorithm="HS256")
    SecretVerifier(config()).verify(token)


def test_not_yet_valid() -> None:
    refused(jwt.encode(claims(nbf=int(time.time()) + 60), HS_KEY, algorithm="HS256"))
    refused(jwt.encode(claims(iat=int(time.time()) + 60), HS_KEY, algorithm="HS256"))


@pytest.mark.parametrize("value", [None, "", 12345, ["ugw_x"]])
def test_client_secret_claim_required_as_a_string(value: Any) -> None:
    refused(jwt.encode(claims(client_secret=value), HS_KEY, algorithm="HS256"))


def test_reprs_never_show_keys() -> None:
    verifier = SecretVerifier(config())
    assert HS_KEY.decode() not in repr(config())
    assert HS_KEY.decode() not in repr(verifier._keys)


def test_a_remembered_secret_still_expires_on_time() -> None:
    """Verified Secrets are remembered by their text; the memory must not outlive ``exp``."""
    verifier = SecretVerifier(
        AuthConfig(
            algorithms=("HS256",),
            keys=MappingProxyType({"default": SigningKey("default", secret=SecretValue(HS_KEY))}),
            leeway=0,
        )
    )
    token = jwt.encode(
        {"client_secret": API_KEY, "exp": int(time.time()) + 1}, HS_KEY, algorithm="HS256"
    )
    first = verifier.verify(token)
    assert verifier.verify(token) is first  # the second use costs no JWT work
    time.sleep(max(0.0, int(time.time()) + 1 - time.time()) + 1.05)
    with pytest.raises(GatewayError) as info:
        verifier.verify(token)
    assert info.value.code == "expired_secret"

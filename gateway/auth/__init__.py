"""Authentication (SPEC §3): the Secret (secret.py), the active-key set in Redis (keystore.py),
the verdict cache and revocation listener (cache.py), rate limits (ratelimit.py), and the stage
the request path calls (authenticator.py)."""

from gateway.auth.authenticator import Authenticator, Identity

__all__ = ["Authenticator", "Identity"]

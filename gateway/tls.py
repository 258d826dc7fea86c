"""TLS termination (SPEC §7): TLS 1.2 as the floor, and a certificate a reload can renew.

Certificates expire (cert-manager renews them every few weeks), and a gateway that needs a
restart to serve the new one serves the old one until it expires. nginx reads its certificate
again on reload; so does the gateway. The listening socket keeps the one ``SSLContext`` it was
created with, so that context only picks: OpenSSL calls its servername callback on every
ClientHello (with or without SNI), and the callback moves the handshake to the context built
from the files the last reload read. A handshake therefore sees the old certificate or the new
one, whole, never a new certificate with the old key; and a reload whose files do not load (a
key that does not match, a file half-written) fails and keeps the running certificate.
"""

from __future__ import annotations

import ssl

from gateway.config import ConfigError, ConfigIssue
from gateway.config.model import Config

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def tls_context(config: Config) -> ssl.SSLContext | None:
    """TLS termination with TLS 1.2 as the floor, when a certificate is configured; raises
    ``OSError`` or ``ssl.SSLError`` when the certificate or key cannot be loaded."""
    if not config.server.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward secrecy and AEAD only (no CBC, no RSA key exchange); TLS 1.3's suites
    # are all modern and are not affected by this string.
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(config.server.tls_cert_file, config.server.tls_key_file)
    return context


class ServerTls:
    """The listener's context (:attr:`listener`) and the certificate it hands handshakes to."""

    def __init__(self, config: Config) -> None:
        listener = tls_context(config)
        assert listener is not None, "no server.tls_cert_file"
        # Until a reload loads another pair, handshakes stay on the listener's own context.
        self.listener = self._current = listener
        listener.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self._current

    def load(self, config: Config, source: str) -> ssl.SSLContext | None:
        """The context for the certificate ``config`` names, for :meth:`serve` once the rest of
        the reload has loaded too; raises ``ConfigError`` when it cannot be loaded. TLS cannot be
        turned off by a reload (the listener was created with it): None keeps what is served."""
        try:
            return tls_context(config)
        except (OSError, ssl.SSLError) as exc:
            issue = ConfigIssue(None, "server.tls_cert_file", f"cannot load with its key: {exc}")
            raise ConfigError([issue], source) from None

    def serve(self, context: ssl.SSLContext | None) -> None:
        """New handshakes get ``context`` (from :meth:`load`); None changes nothing."""
        if context is not None:
            self._current = context

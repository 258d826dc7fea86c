"""TLS on both sides (SPEC §7): termination with TLS 1.2 as the floor and modern ciphers only, and
verified TLS to the backend.

Every refusal is checked against a control server that uses the same certificate but accepts
anything, so a failure is the gateway's policy and not this machine's OpenSSL refusing to speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import signal
import socket
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.faults import wait_until
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    start_gateway,
    write_atomically,
)
from tests.support.procs import RedisServer, free_port
from tests.support.rawhttp import parse_response

LEGACY = "ALL:@SECLEVEL=0"  # lets this client offer what a modern OpenSSL would not


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key, now = _key(), datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate, ca_key: rsa.RSAPrivateKey
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """RSA on purpose: a cipher string that still allowed plain-RSA key exchange would show."""
    key, now = _key(), datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("Test CA")
    other_ca, _ = _ca("Some Other CA")
    cert, key = _leaf(ca, ca_key)
    (out / "ca.pem").write_bytes(_pem(ca))
    (out / "other-ca.pem").write_bytes(_pem(other_ca))
    (out / "server.pem").write_bytes(_pem(cert))
    (out / "server.key").write_bytes(_key_pem(key))
    return Pki(out / "ca.pem", out / "other-ca.pem", out / "server.pem", out / "server.key")


@pytest.fixture(scope="module")
def tls_gateway(
    pki: Pki,
    redis_server: RedisServer,
    backend_proc: BackendProc,
    spool_dir: Path,
    gateway: GatewayProc,  # the shared one created the API key; both use the same Redis
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProc]:
    config = base_config(redis_server.url, backend_proc.url, spool_dir)
    config["server"].update({"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key)})
    gw = start_gateway(config, tmp_path_factory.mktemp("tls-gateway"))
    yield gw
    gw.stop()


def client_context(
    pki: Pki, version: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if ciphers is not None:
            context.set_ciphers(ciphers)
    return context


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """(protocol version, cipher) of a completed handshake; raises SSLError when refused."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return str(tls.version()), tls.cipher()[0]


@pytest.fixture(scope="module")
def permissive_port(pki: Pki) -> Iterator[int]:
    """A control TLS server with the gateway's certificate that accepts any version and cipher."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers(LEGACY)
    context.load_cert_chain(str(pki.cert), str(pki.key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(ssl.SSLError, OSError):
                    context.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_a_connection_that_never_starts_its_handshake_is_closed_after_the_header_timeout(
    pki: Pki,
    redis_server: RedisServer,
    backend_proc: BackendProc,
    tmp_path: Path,
) -> None:
    """Until its handshake is done a connection is not the app's: no head timer, not counted
    against ``server.max_connections``. The loop's own default gave it 60 s; like nginx, the
    handshake now has ``server.header_timeout``. A client that does handshake is served."""
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["server"].update(
        {"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key), "header_timeout": "1s"}
    )
    gw = start_gateway(config, tmp_path)
    try:
        # No ClientHello: the read ends when the gateway closes the connection, or times out
        # after 20 s (failing) where the loop's default would hold it for 60.
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=20) as silent,
            contextlib.suppress(ConnectionResetError),
        ):
            assert silent.recv(1) == b"", "the gateway sent something to a silent client"
        assert handshake(gw.port, client_context(pki))[0] in ("TLSv1.2", "TLSv1.3")
    finally:
        gw.stop()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_clients_are_served_and_forwarded_as_https(
    tls_gateway: GatewayProc, backend: BackendProc, secret: str, pki: Pki, version: ssl.TLSVersion
) -> None:
    request = (
        f"GET /t/status/200 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {secret}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    context = client_context(pki, version)
    expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    with (
        socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() == expected
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert parse_response(data).status == 200
    [record] = backend.records()
    proto = [v for k, v in record["headers"] if k.lower() == "x-forwarded-proto"]
    assert proto == ["https"]


def test_tls_1_1_client_is_refused_by_the_gateways_minimum_version(
    tls_gateway: GatewayProc, permissive_port: int, pki: Pki
) -> None:
    """Same client, same ciphers: only the version differs between served and refused."""
    context = client_context(pki, ssl.TLSVersion.TLSv1_1, LEGACY)
    assert handshake(permissive_port, context)[0] == "TLSv1.1"  # this client can speak it
    with pytest.raises(ssl.SSLError):
        handshake(tls_gateway.port, context)
    tls12 = client_context(pki, ssl.TLSVersion.TLSv1_2, LEGACY)
    assert handshake(tls_gateway.port, tls12)[0] == "TLSv1.2"


@pytest.mark.parametrize(
    "ciphers",
    [
        "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA",  # CBC
        "AES128-GCM-SHA256:AES256-GCM-SHA384",  # no forward secrecy (RSA key exchange)
        "AES128-SHA:AES256-SHA",  # neither
    ],
)
def test_tls_1_2_client_with_only_legacy_ciphers_is_refused(
    tls_gateway: GatewayProc, permissive_port: int, pki: Pki, ciphers: str
) -> None:
    context = client_context(pki, ssl.TLSVersion.TLSv1_2, ciphers + ":@SECLEVEL=0")
    assert handshake(permissive_port, context)[0] == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        handshake(tls_gateway.port, context)


def test_tls_1_2_negotiates_forward_secret_aead(tls_gateway: GatewayProc, pki: Pki) -> None:
    """Offered everything, the gateway still picks ECDHE with an AEAD cipher."""
    context = client_context(pki, ssl.TLSVersion.TLSv1_2, LEGACY)
    version, cipher = handshake(tls_gateway.port, context)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


# -- TLS to the backend ---------------------------------------------------------------------------


async def _https_backend(pki: Pki) -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls backend saw {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.cert), str(pki.key))
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


GatewayTo = Callable[[Path], Awaitable[GatewayProc]]


@pytest.fixture
async def gateway_to_https_backend(
    pki: Pki,
    redis_server: RedisServer,
    spool_dir: Path,
    gateway: GatewayProc,  # the shared one created the API key; both use the same Redis
    tmp_path: Path,
) -> AsyncIterator[GatewayTo]:
    """Starts a gateway whose backend speaks TLS with ``pki``'s certificate, verified against
    the CA bundle given; both are stopped after the test."""
    started: list[tuple[GatewayProc, web.AppRunner]] = []

    async def start(ca_file: Path) -> GatewayProc:
        runner, port = await _https_backend(pki)
        config = base_config(redis_server.url, f"https://127.0.0.1:{port}", spool_dir)
        config["backend"]["ca_file"] = str(ca_file)
        gw = await asyncio.to_thread(start_gateway, config, tmp_path)  # the backend serves on
        started.append((gw, runner))
        return gw

    yield start
    for gw, runner in started:
        await asyncio.to_thread(gw.stop)
        await runner.cleanup()


async def _get(gw: GatewayProc, secret: str, path: str) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as session, session.get(gw.url + path, headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(("trusted", "status"), [(True, 200), (False, 502)])
async def test_backend_tls_is_verified_against_the_configured_ca(
    pki: Pki, gateway_to_https_backend: GatewayTo, secret: str, trusted: bool, status: int
) -> None:
    gw = await gateway_to_https_backend(pki.ca if trusted else pki.other_ca)
    got, body = await _get(gw, secret, "/hello")
    assert got == status, body
    if trusted:
        assert body == b"tls backend saw /hello"
    else:
        assert json.loads(body)["code"] == "backend_unavailable"


async def test_a_renewed_backend_ca_bundle_is_read_again_under_the_same_path(
    pki: Pki, gateway_to_https_backend: GatewayTo, secret: str, tmp_path: Path
) -> None:
    """A backend whose certificate moved to a new CA, with the bundle renewed in place (a
    mounted trust bundle keeps its path): the pool was rebuilt only when the backend settings
    changed, so the gateway kept refusing the backend (502) until every replica restarted."""
    bundle = tmp_path / "backend-ca.pem"
    bundle.write_bytes(pki.other_ca.read_bytes())
    gw = await gateway_to_https_backend(bundle)
    assert (await _get(gw, secret, "/hi"))[0] == 502  # signed by a CA the bundle lacks
    write_atomically(bundle, pki.ca.read_bytes())
    deadline = asyncio.get_running_loop().time() + 15
    while (await _get(gw, secret, "/hi"))[0] != 200:
        assert asyncio.get_running_loop().time() < deadline, "the bundle was not read again"
        await asyncio.sleep(0.2)


def _served(port: int, context: ssl.SSLContext, name: str | None = "localhost") -> bytes:
    """The certificate a new handshake gets, DER (``name``: the SNI sent, None for none)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        served = tls.getpeercert(binary_form=True)
        assert served is not None
        return served


def _unauthorized_on(tls: ssl.SSLSocket) -> bool:
    """One keep-alive request on an open TLS connection: answered (401, no Secret)?"""
    tls.sendall(b"GET /inbox HTTP/1.1\r\nHost: gw\r\n\r\n")
    head = tls.recv(65536)
    return head.startswith(b"HTTP/1.1 401")


def test_a_reload_serves_a_renewed_certificate_without_a_restart(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """Certificates are renewed every few weeks: the gateway read its certificate once, at
    start, and served it until it expired unless every replica was restarted. Now the files
    are watched and a reload (or SIGHUP) reads them again for new handshakes, as nginx's
    reload does; a connection made before keeps working; a certificate that does not match
    its key fails the reload, and the running certificate stays."""
    ca, ca_key = _ca("Renewing CA")
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    first, first_key = _leaf(ca, ca_key)
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(_pem(first))
    key_file.write_bytes(_key_pem(first_key))
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["server"].update({"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)})
    gw = start_gateway(config, tmp_path)
    try:
        der = serialization.Encoding.DER
        assert _served(gw.port, client) == first.public_bytes(der)
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock,
            client.wrap_socket(sock, server_hostname="localhost") as kept,
        ):
            assert _unauthorized_on(kept)
            renewed, renewed_key = _leaf(ca, ca_key)
            generation = gw.readyz_checks()["config_generation"]
            write_atomically(key_file, _key_pem(renewed_key))
            write_atomically(cert_file, _pem(renewed))  # the files are watched: no SIGHUP needed
            assert wait_until(lambda: _served(gw.port, client) == renewed.public_bytes(der), 15)
            assert gw.readyz_checks()["config_generation"] > generation
            assert _served(gw.port, client) == renewed.public_bytes(der)
            assert _unauthorized_on(kept)  # made under the old certificate, still served
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            pinned = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            pinned.minimum_version = pinned.maximum_version = version
            assert _served(gw.port, pinned) == renewed.public_bytes(der), version
        without_sni = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        without_sni.check_hostname = False  # no name to check: the handshake sends none
        assert _served(gw.port, without_sni, None) == renewed.public_bytes(der)

        generation = gw.readyz_checks()["config_generation"]
        mismatched, _ = _leaf(ca, ca_key)  # its key is not the one in key_file
        write_atomically(cert_file, _pem(mismatched))
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: gw.readyz_checks()["config_error"] is not None, 15)
        assert "server.tls_cert_file" in str(gw.readyz_checks()["config_error"])
        assert gw.readyz_checks()["config_generation"] == generation
        assert _served(gw.port, client) == renewed.public_bytes(der)
        assert gw.proc.poll() is None
    finally:
        gw.stop()

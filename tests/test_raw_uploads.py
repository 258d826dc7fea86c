"""Raw (non-multipart) uploads end to end (SPEC §4: ``PUT``/``POST`` with any other content type,
the whole body is one file): its name, an empty body, and a name given twice. Every refusal is
proven as in ``test_uploads.py``: status, problem+json, nothing at the backend, no spool left."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import mint
from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc, base_config, start_gateway
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response
from tests.test_uploads import UPLOAD, _read_response, assert_no_spool_left, assert_refused

SCRIPT = b'MsgBox "hello"\r\n' * 4  # libmagic: text/plain, which "documents" admits


def _read_to_close(sock: socket.socket) -> bytes:
    """The whole answer: a refusal before the body closes the connection."""
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(scope="module")
def named_gateway(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    """The shared configuration plus a route whose URL names the file (``PUT /files/{channel}/
    {filename}``, as in ``tests/support/files.py``'s policies)."""
    workdir = tmp_path_factory.mktemp("named-gateway")
    (workdir / "spool").mkdir()
    config = base_config(redis_server.url, backend_proc.url, workdir / "spool")
    config["uploads"]["routes"].append({"path": "/files/{channel}/{filename}", "methods": ["PUT"]})
    gw = start_gateway(config, workdir)
    yield gw
    gw.stop()


async def send(
    gateway: GatewayProc,
    secret: str,
    body: bytes,
    path: str = UPLOAD,
    method: str = "POST",
    **extra: str,
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {secret}", **extra}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gateway.url + path, data=body, headers=headers) as r,
    ):
        raw = await r.read()
        doc = json.loads(raw) if r.content_type.endswith("json") and raw else {}
        return r.status, doc, r.headers


@pytest.mark.parametrize("role", ["agent", "customer"])
async def test_an_empty_raw_body_is_an_empty_file_and_is_judged_as_one(
    gateway: GatewayProc, backend: BackendProc, api_key: str, role: str
) -> None:
    """README: "An empty file sniffs as application/x-empty and is refused unless allowed"; only
    a browser's empty file *input* in a form is no file. A raw body is always the one file
    (SPEC §4), so ``Content-Length: 0`` on an upload route sent the backend an empty file that
    neither role may upload, unjudged, while the same empty body with a name was refused."""
    secret = mint(gateway, api_key, f"role={role}")
    for extra in ({}, {"Content-Disposition": 'attachment; filename="notes"'}):
        # (with a name it was refused already)
        status, doc, headers = await send(
            gateway, secret, b"", **{"Content-Type": "application/octet-stream", **extra}
        )
        assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
        assert doc["sniffed_type"] == "application/x-empty"


async def test_a_raw_body_named_differently_by_its_url_and_content_disposition_is_refused(
    named_gateway: GatewayProc, backend: BackendProc, api_key: str
) -> None:
    """On a route whose URL names the file, a ``Content-Disposition`` filename replaced that name
    for every rule: ``PUT /files/4711/run.vbs`` declared ``notes.txt`` was judged a text
    document, while the backend stores the resource the URL names (or serves it back under the
    other). Two names of different kinds are one body read two ways: 400, before any byte."""
    secret = mint(named_gateway, api_key, "role=agent")
    disposition = {"Content-Disposition": 'attachment; filename="notes.txt"'}
    status, doc, headers = await send(
        named_gateway, secret, SCRIPT, "/files/4711/run.vbs", "PUT", **disposition
    )
    assert_refused(named_gateway, backend, status, doc, headers, 400, "malformed_request")
    # the other way round the declared name was judged already
    status, doc, headers = await send(
        named_gateway,
        secret,
        SCRIPT,
        "/files/4711/notes.txt",
        "PUT",
        **{"Content-Disposition": "attachment; filename*=UTF-8''run.vbs"},
    )
    assert_refused(named_gateway, backend, status, doc, headers, 400, "malformed_request")
    # a name without an extension claims nothing: the URL's is judged (a script by its name)
    disposition = {"Content-Disposition": 'attachment; filename="notes"'}
    status, doc, headers = await send(
        named_gateway, secret, SCRIPT, "/files/4711/run.vbs", "PUT", **disposition
    )
    assert_refused(named_gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["fileName"] == "run.vbs"
    # refused before the body: a client asking to continue never gets to send it
    head = (
        f"PUT /files/4711/run.vbs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        f'Content-Disposition: attachment; filename="notes.txt"\r\n'
        f"Content-Length: {len(SCRIPT)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", named_gateway.port)) as sock:
        sock.sendall(head)
        data = _read_response(sock)
    assert parse_response(data).status == 400, data[:60]
    assert backend.records() == []
    assert_no_spool_left(named_gateway)


async def test_a_raw_body_named_alike_by_url_and_content_disposition_passes(
    named_gateway: GatewayProc, backend: BackendProc, api_key: str, tmp_path: Path
) -> None:
    """Names that agree on the kind of file (a camera's name in the header, the app's in the
    URL) are not refused; a URL name alone still names the body."""
    secret = mint(named_gateway, api_key, "role=customer")
    png = files.png()
    disposition = {"Content-Disposition": 'attachment; filename="IMG_0001.PNG"'}
    status, doc, _ = await send(
        named_gateway, secret, png, "/files/4711/photo.png", "PUT", **disposition
    )
    assert status == 200, doc
    disposition = {"Content-Disposition": 'attachment; filename="photo.png"'}
    status, doc, _ = await send(
        named_gateway, secret, png, "/files/4711/obj.123", "PUT", **disposition
    )
    assert status == 200, doc  # an id's unknown extension claims nothing
    status, doc, _ = await send(named_gateway, secret, png, "/files/4711/photo.pdf", "PUT")
    assert status == 415 and doc["code"] == "type_mismatch" and doc["fileName"] == "photo.pdf"
    assert len(backend.records()) == 2
    assert_no_spool_left(named_gateway)


async def test_a_raw_body_with_two_content_dispositions_is_refused(
    gateway: GatewayProc, backend: BackendProc, api_key: str
) -> None:
    """A raw body named by two ``Content-Disposition`` headers was judged by the first and
    forwarded with both: aiohttp and Go backends read the first, Node and gunicorn (WSGI) join
    them with a comma and a parser may take the last. Refused like a form part's header given
    twice (README: "One reading of the body"), before the body."""
    secret = mint(gateway, api_key, "role=agent")
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="notes.txt"\r\n'
        'Content-Disposition: attachment; filename="run.vbs"\r\n'
        f"Content-Length: {len(SCRIPT)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head)
        data = _read_to_close(sock)
    response = parse_response(data)
    assert response.status == 400, data[:60]
    assert response.header("Content-Type") == "application/problem+json"
    assert json.loads(response.body)["code"] == "malformed_request"
    assert backend.records() == []
    assert_no_spool_left(gateway)


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",  # a raw body labelled as a form, without a boundary
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=a; boundary=b",
        'multipart/form-data; x="; boundary=b"; boundary=a',
    ],
)
def test_a_form_without_one_clear_boundary_is_refused_before_100_continue(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str, content_type: str
) -> None:
    """SPEC §4: with ``Expect: 100-continue`` "the client is refused before it sends anything"
    for what the headers prove. A Content-Type without one clear boundary is refused (400)
    whatever the body holds, yet it was judged only once the body was read: the client was
    told to continue and sent the whole body (up to 50 MB) for nothing."""
    body = files.png()
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {agent_secret}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head)
        data = _read_to_close(sock)
    assert not data.startswith(b"HTTP/1.1 100"), data[:60]
    response = parse_response(data)
    assert response.status == 400
    assert json.loads(response.body)["code"] == "malformed_request"
    assert backend.records() == []
    assert_no_spool_left(gateway)

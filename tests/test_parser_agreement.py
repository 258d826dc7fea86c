"""Bodies two parsers read two ways are refused (SPEC §4): the gateway's verdict is only worth
something if the backend sees the same files. Each case first shows, with a real parser a
backend would use (aiohttp's own multipart helpers or Python's ``email``), that the body hides a
file or a role from python-multipart; then that the real gateway refuses it: status,
problem+json, nothing at the backend, no spool file left.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
from typing import Any

import aiohttp
import pytest
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc
from tests.test_uploads import UPLOAD, assert_refused

B = "XyZ"
MULTIPART = f"multipart/form-data; boundary={B}"
PNG, ELF = files.png(), files.elf()


def part(disposition: str, data: bytes, extra: str = "", boundary: str = B) -> bytes:
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n"
    return head.encode() + data + b"\r\n"


def end(boundary: str = B) -> bytes:
    return f"--{boundary}--\r\n".encode()


def email_files(body: bytes, content_type: str) -> list[tuple[str | None, bytes]]:
    """What Python's ``email`` package (the parser under ``cgi`` and many scripts) reads."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return [
        (sub.get_filename(), sub.get_payload(decode=True) or b"")
        for sub in message.iter_parts()  # type: ignore[attr-defined]
    ]


async def send(
    gateway: GatewayProc, secret: str, body: bytes, content_type: str = MULTIPART, **extra: str
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": content_type, **extra}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + UPLOAD, data=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None), r.headers


async def assert_malformed(
    gateway: GatewayProc, backend: BackendProc, secret: str, body: bytes, **kw: Any
) -> str:
    status, doc, headers = await send(gateway, secret, body, **kw)
    assert_refused(gateway, backend, status, doc, headers, 400, "malformed_request")
    return str(doc["detail"])


async def test_an_rfc2231_continuation_is_a_file_to_backends_and_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    body = part('form-data; name="file"; filename*0="evil.exe"', ELF) + end()
    assert email_files(body, MULTIPART) == [("evil.exe", ELF)]
    detail = await assert_malformed(gateway, backend, secret, body)
    assert "filename*0" in detail


async def test_filename_and_filename_star_naming_different_files_are_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    disposition = 'form-data; name="file"; filename="a.png"; filename*=UTF-8\'\'a.html'
    _, params = parse_content_disposition(disposition)
    assert content_disposition_filename(params, "filename") == "a.html"  # aiohttp's choice
    polyglot = PNG + b"<html><script>alert(document.domain)</script></html>"
    detail = await assert_malformed(gateway, backend, secret, part(disposition, polyglot) + end())
    assert "filename*" in detail


async def test_a_raw_upload_is_judged_by_its_filename_star(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    """Where a raw body's Content-Disposition has only ``filename*``, that is its name."""
    status, doc, headers = await send(
        gateway,
        agent_secret,
        ELF,
        "application/pdf",
        **{"Content-Disposition": "attachment; filename*=UTF-8''report.pdf"},
    )
    assert_refused(gateway, backend, status, doc, headers, 415, "type_mismatch")
    assert doc["fileName"] == "report.pdf"


async def test_a_part_header_given_twice_is_refused(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    twice = "Content-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: binary\r\n"
    body = part('form-data; name="file"; filename="notes.txt"', base64.b64encode(ELF), twice)
    body += end()
    assert email_files(body, MULTIPART) == [("notes.txt", ELF)]  # the first one counts there
    detail = await assert_malformed(gateway, backend, agent_secret, body)
    assert "two content-transfer-encoding headers" in detail


@pytest.mark.parametrize(
    "content_type",
    [
        f"multipart/form-data; boundary=AAA; boundary={B}",
        f'multipart/form-data; x="y;boundary=AAA"; boundary={B}',
    ],
    ids=["given-twice", "inside-a-quoted-parameter"],
)
async def test_an_ambiguous_boundary_is_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str, content_type: str
) -> None:
    """An ELF framed by ``AAA`` inside a PNG framed by ``XyZ``: aiohttp's backend sees AAA."""
    assert parse_mimetype(content_type).parameters["boundary"] == "AAA"
    hidden = part('form-data; name="file"; filename="a.png"', ELF, boundary="AAA") + end("AAA")
    body = part('form-data; name="file"; filename="a.png"', PNG + b"\r\n" + hidden) + end()
    detail = await assert_malformed(gateway, backend, secret, body, content_type=content_type)
    assert "boundary" in detail


async def test_the_boundary_inside_a_parts_data_is_refused(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """A bare LF before ``--boundary`` ends a part for Werkzeug and ``email``, not for us."""
    hidden = f'\n--{B}\r\nContent-Disposition: form-data; name="file"; filename="evil.exe"\r\n\r\n'
    body = part('form-data; name="file"; filename="a.png"', PNG + hidden.encode() + ELF) + end()
    assert ("evil.exe", ELF) in email_files(body, MULTIPART)
    detail = await assert_malformed(gateway, backend, secret, body)
    assert "boundary occurs inside" in detail


@pytest.mark.parametrize(
    "role_parts",
    [
        [
            ("form-data; name=\"x\"; name*=UTF-8''data", b'{"IsManager": false}'),
            ('form-data; name="data"', b'{"IsManager": true}'),
        ],
        [
            ('form-data; name="data"', b'{"IsManager": true}'),
            ('form-data; name="data"', b'{"IsManager": false}'),
        ],
    ],
    ids=["name-star", "given-twice"],
)
async def test_a_role_field_backends_could_read_otherwise_is_refused(
    gateway: GatewayProc,
    backend: BackendProc,
    secret: str,
    role_parts: list[tuple[str, bytes]],
) -> None:
    """Which ``data`` field a backend reads (first, last, or the one ``name*`` names) decides
    agent or customer: a customer must not get an agent's rules by sending two."""
    body = b"".join(part(disposition, value) for disposition, value in role_parts)
    body += part('form-data; name="file"; filename="letter.docx"', files.docx()) + end()
    await assert_malformed(gateway, backend, secret, body)


@pytest.mark.parametrize(
    ("who", "name", "content"),
    [
        ("agent", "invoice.vbs", b'Set s = CreateObject("WScript.Shell")\r\ns.Run "calc"\r\n'),
        ("agent", "update.ps1", b"Start-Process calc.exe\r\n"),
        ("agent", "notes.js", b'WScript.Echo("hi");\n'),
        ("customer", "shell.php", PNG + b"<?php system($_GET['c']); ?>"),
    ],
)
async def test_files_named_to_run_are_executables_whatever_they_contain(
    gateway: GatewayProc,
    backend: BackendProc,
    secret: str,
    agent_secret: str,
    who: str,
    name: str,
    content: bytes,
) -> None:
    """``documents`` admits text/plain and customers PNG; neither admits a script by name."""
    body = part(f'form-data; name="file"; filename="{name}"', content) + end()
    token = agent_secret if who == "agent" else secret
    status, doc, headers = await send(gateway, token, body)
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["fileName"] == name


async def test_an_image_named_xhtml_is_spoofing(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    body = part('form-data; name="file"; filename="page.xhtml"', PNG) + end()
    status, doc, headers = await send(gateway, secret, body)
    assert_refused(gateway, backend, status, doc, headers, 415, "type_mismatch")

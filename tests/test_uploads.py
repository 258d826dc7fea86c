"""Uploads end to end (issue 4): the real gateway process, a real backend that records every byte,
real files. Every refusal is proven four ways: the status, the problem+json body, that the
backend received nothing, and that no spool file is left (on disk or held open)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import mint
from tests.support.files import EXPECTED, FILENAMES, make, multipart
from tests.support.gateway_proc import (
    BackendProc,
    GatewayProc,
    base_config,
    spool_files,
    start_gateway,
)
from tests.support.procs import RedisServer
from tests.support.rawhttp import parse_response, send_chunks_until_answered

MiB = 1024 * 1024
UPLOAD = "/streams/4711/objects"


def spool_fds(gateway: GatewayProc) -> list[str]:
    """Descriptors the gateway holds on spool files (they are unlinked at once, so look here)."""
    spool = str(gateway.config["spool"]["dir"])
    fd_dir = f"/proc/{gateway.proc.pid}/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith(spool):
            out.append(target)
    return out


def assert_no_spool_left(gateway: GatewayProc) -> None:
    # A poll, done as soon as the descriptors are gone: the deadline only decides how long a
    # gateway process starved of CPU (three xdist workers on two cores) gets to close them; a
    # descriptor that is never closed fails as before.
    deadline = time.monotonic() + 10
    while spool_fds(gateway) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_fds(gateway) == []
    assert spool_files(Path(gateway.config["spool"]["dir"])) == []  # none, or never made


async def post(
    gateway: GatewayProc,
    secret: str,
    parts: list[tuple[str, str | None, str | None, bytes]],
    path: str = UPLOAD,
    **headers: str,
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders, bytes]:
    body, ctype = multipart(parts)
    hdrs = {"Authorization": f"Bearer {secret}", "Content-Type": ctype, **headers}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + path, data=body, headers=hdrs) as r,
    ):
        raw = await r.read()
        doc = json.loads(raw) if r.content_type.endswith("json") and raw else {}
        return r.status, doc, r.headers, body


def assert_refused(
    gateway: GatewayProc,
    backend: BackendProc,
    status: int,
    doc: dict[str, Any],
    headers: Any,
    expected_status: int,
    code: str,
) -> None:
    assert status == expected_status, doc
    assert headers["Content-Type"].startswith("application/problem+json")
    assert doc["status"] == expected_status and doc["code"] == code
    assert doc["type"].endswith(code) and doc["title"] and doc["request_id"]
    assert backend.records() == [], "a refused upload must send the backend nothing"
    assert_no_spool_left(gateway)


def file_part(
    kind: str,
    size: int | None = None,
    name: str | None = None,
    ctype: str | None = None,
    field: str = "file",
) -> tuple[str, str, str | None, bytes]:
    return (field, name or FILENAMES[kind], ctype, make(kind, size))


# -- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "role"),
    [
        ("png", "customer"),
        ("jpeg", "customer"),
        ("pdf", "customer"),
        ("docx", "agent"),
        ("xlsx", "agent"),
        ("zip", "agent"),
        ("gif", "agent"),
        ("text", "agent"),
    ],
)
async def test_allowed_files_reach_the_backend_byte_identical(
    gateway: GatewayProc, backend: BackendProc, api_key: str, kind: str, role: str
) -> None:
    secret = mint(gateway, api_key, f"role={role}")
    status, doc, _, body = await post(gateway, secret, [file_part(kind)])
    assert status == 200, doc
    assert doc["status"] == "success"
    [rec] = backend.records()
    assert rec["sha256"] == hashlib.sha256(body).hexdigest()
    assert rec["length"] == len(body)
    seen = {k.lower(): v for k, v in rec["headers"]}
    assert seen["content-length"] == str(len(body))
    assert "transfer-encoding" not in seen
    assert_no_spool_left(gateway)


async def test_whatsapp_agent_video_and_voice_pass(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    parts = [file_part("mp4", field="pic"), file_part("ogg", field="pic")]
    status, doc, _, body = await post(
        gateway, agent_secret, parts, "/whatsapp/uploadmedia/whatsapp"
    )
    assert status == 200, doc
    assert backend.records()[0]["sha256"] == hashlib.sha256(body).hexdigest()


async def test_a_big_spooled_upload_arrives_intact(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    """19 MiB: well past the memory threshold, so it goes through the encrypted spool file."""
    status, doc, _, body = await post(gateway, agent_secret, [file_part("pdf", 19 * MiB)])
    assert status == 200, doc
    assert backend.records()[0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert_no_spool_left(gateway)


async def test_a_file_of_exactly_the_limit_passes_and_one_byte_more_does_not(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    status, doc, _, _ = await post(gateway, secret, [file_part("png", 10 * MiB)])
    assert status == 200, doc
    backend.clear()
    status, doc, headers, _ = await post(gateway, secret, [file_part("png", 10 * MiB + 1)])
    assert_refused(gateway, backend, status, doc, headers, 413, "file_too_large")
    assert doc["limit_bytes"] == 10 * MiB
    assert doc["channel"] == "default" and doc["role"] == "customer"
    assert doc["limit_source"] == "channels.default.customers.max_file_size"
    assert doc["unValidActivity"] == 16 and doc["maxFileSizeAllow"] == 10
    assert doc["fileName"] == "photo.png" and doc["fileExtension"] in ("png", ".png")
    assert "channel's media settings" in doc["detail"]


# -- refused by type -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["elf", "pe"])
async def test_an_executable_named_invoice_pdf_is_spoofing(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str, kind: str
) -> None:
    """SPEC §5: every 415 carries the sniffed type and the allowed list."""
    part = file_part(kind, name="invoice.pdf", ctype="application/pdf")
    status, doc, headers, _ = await post(gateway, agent_secret, [part])
    assert_refused(gateway, backend, status, doc, headers, 415, "type_mismatch")
    assert doc["unValidActivity"] == 15
    assert doc.get("sniffed_type") == EXPECTED[kind]
    assert doc["allowed_types"] == ["images", "documents", "application/zip"]
    assert doc["role"] == "agent" and doc["channel"] == "default"


@pytest.mark.parametrize("kind", ["pe", "elf"])
async def test_executables_are_refused_even_for_agents(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str, kind: str
) -> None:
    status, doc, headers, _ = await post(gateway, agent_secret, [file_part(kind)])
    assert status == 415, doc
    assert doc["code"] in ("type_not_allowed", "type_mismatch")
    assert_refused(gateway, backend, status, doc, headers, 415, doc["code"])


async def test_an_svg_is_not_an_image_for_a_channel_that_allows_images(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    """Agents on ``default`` may send ``images``; an SVG with a script in it is refused there."""
    status, doc, headers, _ = await post(gateway, agent_secret, [file_part("svg")])
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["sniffed_type"] == "image/svg+xml" and doc["unValidActivity"] == 15
    assert doc["allowed_types"] == ["images", "documents", "application/zip"]
    assert "can carry scripts" in doc["detail"]


async def test_a_type_the_role_may_not_send_is_refused_with_the_allowed_list(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    status, doc, headers, _ = await post(gateway, secret, [file_part("docx")])
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["sniffed_type"] == EXPECTED["docx"]
    assert doc["allowed_types"] == ["image/png", "image/jpeg", ".pdf"]
    assert doc["unValidActivity"] == 15 and doc["fileExtension"] in ("docx", ".docx")


async def test_one_bad_file_among_several_refuses_the_whole_request(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    parts = [file_part("png"), file_part("pdf"), file_part("jpeg"), file_part("zip")]
    status, doc, headers, _ = await post(gateway, secret, parts)
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")


async def test_too_many_files(gateway: GatewayProc, backend: BackendProc, secret: str) -> None:
    parts = [file_part("png", name=f"p{i}.png") for i in range(11)]
    status, doc, headers, _ = await post(gateway, secret, parts)
    assert_refused(gateway, backend, status, doc, headers, 413, "too_many_files")


# -- role --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_first", [True, False])
async def test_the_platforms_is_manager_marker_makes_an_agent(
    gateway: GatewayProc, backend: BackendProc, secret: str, data_first: bool
) -> None:
    """No role claim: the `data` field's IsManager decides, wherever it sits among the parts."""
    data = ("data", None, "application/json", json.dumps({"IsManager": True}).encode())
    parts = [data, file_part("docx")] if data_first else [file_part("docx"), data]
    status, doc, _, _ = await post(gateway, secret, parts)
    assert status == 200, doc
    backend.clear()
    customer = ("data", None, None, json.dumps({"IsManager": False}).encode())
    status, doc, headers, _ = await post(gateway, secret, [customer, file_part("docx")])
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")


async def test_a_data_field_nested_too_deeply_to_read_is_a_400_not_a_500(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """Python's JSON reader stops at ~1000 levels with a RecursionError (it was a 500 and an
    ERROR traceback per request); a backend reading deeper could find an IsManager the
    gateway cannot, so the body is refused as read two ways. Well within the 64 KiB cap."""
    deep = b'{"IsManager": true, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    data = ("data", None, "application/json", deep)
    status, doc, headers, _ = await post(gateway, secret, [file_part("docx"), data])
    assert_refused(gateway, backend, status, doc, headers, 400, "malformed_request")
    assert "nests too deeply" in doc["detail"]


FORM_BOUNDS = {  # the parts, and the words of the refusal
    # python-multipart: at most 4,224 bytes per part header (a 5,000-character file name)
    "part_header_size": (
        [file_part("png", name="a" * 5000 + ".png")],
        "Maximum header size exceeded",
    ),
    # python-multipart: at most 8 headers per part
    "part_header_count": (
        [("data", None, None, b"{}"), file_part("png")],
        "Maximum header count exceeded",
    ),
    # gateway/inspect/multipart.py MAX_FIELDS: 256 non-file fields
    "field_count": (
        [(f"f{i}", None, None, b"x") for i in range(257)] + [file_part("png")],
        "more than 256 form fields",
    ),
    # MAX_ROLE_FIELD: the role field, kept whole to read IsManager, is at most 64 KiB
    "role_field_size": (
        [
            ("data", None, "application/json", b'{"IsManager": 1, "p": "' + b"x" * 66000 + b'"}'),
            file_part("png"),
        ],
        "is over 65536 bytes",
    ),
}


@pytest.mark.parametrize("bound", sorted(FORM_BOUNDS))
async def test_every_bound_on_what_a_form_makes_the_gateway_hold_is_enforced(
    gateway: GatewayProc, backend: BackendProc, secret: str, bound: str
) -> None:
    """What the inspection keeps per part (headers, the role field) and per request (fields)
    is bounded whatever the request limit allows; past a bound the body is a 400."""
    parts, words = FORM_BOUNDS[bound]
    body, ctype = multipart(parts)
    if bound == "part_header_count":
        extra = "".join(f"X-Part-{i}: v\r\n" for i in range(9)).encode()
        body = body.replace(b'name="data"\r\n', b'name="data"\r\n' + extra, 1)
    hdrs = {"Authorization": f"Bearer {secret}", "Content-Type": ctype}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + UPLOAD, data=body, headers=hdrs) as r,
    ):
        doc = json.loads(await r.read())
        assert_refused(gateway, backend, r.status, doc, r.headers, 400, "malformed_request")
        assert words in doc["detail"], doc["detail"]


async def test_uploads_disabled_for_the_channel_and_role(
    gateway: GatewayProc, backend: BackendProc, api_key: str
) -> None:
    secret = mint(gateway, api_key, "role=customer")
    status, doc, headers, _ = await post(
        gateway, secret, [file_part("png", field="pic")], "/whatsapp/uploadmedia/whatsapp"
    )
    assert_refused(gateway, backend, status, doc, headers, 403, "uploads_disabled")
    assert doc["unValidActivity"] == 17


async def test_an_upload_without_a_secret_is_refused_before_anything(
    gateway: GatewayProc, backend: BackendProc
) -> None:
    body, ctype = multipart([file_part("png")])
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.url + UPLOAD, data=body, headers={"Content-Type": ctype}) as r,
    ):
        doc = json.loads(await r.read())
        assert_refused(gateway, backend, r.status, doc, r.headers, 401, "missing_secret")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


# -- early rejection and streaming ----------------------------------------------------------------


def _headers(secret: str, length: int, extra: str = "") -> bytes:
    _, ctype = multipart([])
    return (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_content_length_over_the_request_limit_is_refused_without_reading_the_body(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(_headers(secret, 60 * MiB))
        data = _read_response(sock)
    response = parse_response(data)
    assert response.status == 413
    assert b'"request_too_large"' in data
    assert backend.records() == []
    assert_no_spool_left(gateway)


def test_expect_100_continue_is_answered_413_and_the_client_sends_nothing(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(_headers(secret, 60 * MiB, "Expect: 100-continue\r\n"))
        data = _read_response(sock)
    assert not data.startswith(b"HTTP/1.1 100"), data[:40]
    assert parse_response(data).status == 413
    assert backend.records() == []


def test_expect_100_continue_gets_continue_when_the_request_may_proceed(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    body, ctype = multipart([file_part("png")])
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head)
        assert _read_response(sock).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        final = _read_response(sock)
    assert parse_response(final).status == 200
    assert backend.records()[0]["sha256"] == hashlib.sha256(body).hexdigest()


def test_a_chunked_oversize_upload_is_cut_off_as_the_limit_is_crossed(
    gateway: GatewayProc, backend: BackendProc, api_key: str
) -> None:
    """No Content-Length: the gateway must stop reading soon after 10 MiB (customer limit)."""
    secret = mint(gateway, api_key, "role=customer")
    part_head, ctype = multipart([("file", "big.png", None, b"")])
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    prefix = part_head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + make("png")
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        sent, data = send_chunks_until_answered(sock, 40 * MiB)
        if b"\r\n\r\n" not in data:
            data += _read_response(sock)
    assert parse_response(data).status == 413
    assert b'"file_too_large"' in data
    assert sent < 10 * MiB + 8 * MiB, f"sent {sent} bytes before the refusal"
    assert backend.records() == []
    assert_no_spool_left(gateway)


def test_a_client_vanishing_mid_upload_leaves_nothing_behind(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    body, ctype = multipart([file_part("pdf", 8 * MiB)])
    head = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {agent_secret}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + body[: 5 * MiB])
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    time.sleep(0.5)
    assert backend.records() == []
    assert_no_spool_left(gateway)


# -- clients and browsers --------------------------------------------------------------------


async def test_empty_file_inputs_count_as_fields_and_are_bounded(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    """A browser's empty file input (``filename=""``, no bytes) is not a file, so it counts
    against neither ``max_files`` nor the file rules; unbounded, each one was kept for the whole
    request (400,000 in 25 MB cost a worker >100 MiB). It counts as a form field now."""
    empty = ("f", "", None, b"")
    status, doc, headers, _ = await post(gateway, agent_secret, [empty] * 300 + [file_part("png")])
    assert_refused(gateway, backend, status, doc, headers, 400, "malformed_request")
    assert "form fields" in doc["detail"]


async def test_a_removed_spool_dir_is_made_again(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str
) -> None:
    """A tmp cleaner may remove the (always empty) spool dir: the next spill makes it again
    instead of every spill being 507 until a restart (nginx does the same for its temp path)."""
    spool = Path(gateway.config["spool"]["dir"])
    # 200 kB: over the 64 KiB memory threshold, so each of these spills
    assert (await post(gateway, agent_secret, [file_part("pdf", 200_000)]))[0] == 200
    shutil.rmtree(spool)
    backend.clear()
    status, doc, _, body = await post(gateway, agent_secret, [file_part("pdf", 200_000)])
    assert status == 200, doc
    assert spool.is_dir() and os.listdir(spool) == []
    [rec] = backend.records()
    assert rec["sha256"] == hashlib.sha256(body).hexdigest()


def curl_upload(gateway: GatewayProc, secret: str, path: Path) -> tuple[str, str]:
    """``curl -F file=@path`` as a real client would; returns (body, HTTP status)."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by make test"
    out = subprocess.run(
        [curl, "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {secret}",
         "-F", f"file=@{path}", gateway.url + UPLOAD],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    body, code = out.stdout.rsplit("\n", 1)
    return body, code


def test_curl_as_a_real_client(
    gateway: GatewayProc, backend: BackendProc, secret: str, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(make("png", 300_000))
    body, code = curl_upload(gateway, secret, photo)
    assert code == "200", body
    assert json.loads(body)["data"]["files"][0]["size"] == 300_000
    fake = tmp_path / "invoice.pdf"
    fake.write_bytes(make("elf"))
    backend.clear()
    body, code = curl_upload(gateway, secret, fake)
    assert code == "415" and json.loads(body)["code"] == "type_mismatch"
    assert backend.records() == []


async def test_refusals_carry_cors_headers_for_allowed_origins_only(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    _, _, headers, _ = await post(
        gateway, secret, [file_part("docx")], Origin="https://chat.example.com"
    )
    assert headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
    _, _, headers, _ = await post(gateway, secret, [file_part("docx")], Origin="https://evil.test")
    assert "Access-Control-Allow-Origin" not in headers


async def test_a_cors_preflight_needs_no_secret(gateway: GatewayProc, backend: BackendProc) -> None:
    hdrs = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as s, s.options(gateway.url + UPLOAD, headers=hdrs) as r:
        assert r.status == 200
    assert [rec["method"] for rec in backend.records()] == ["OPTIONS"]


async def test_clients_can_ask_for_their_policy(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str, secret: str
) -> None:
    async with aiohttp.ClientSession() as s:
        url = gateway.url + "/_gateway/policy/whatsapp"
        async with s.get(url, headers={"Authorization": f"Bearer {agent_secret}"}) as r:
            doc = await r.json()
        assert doc["role"] == "agent" and doc["channel"] == "whatsapp"
        assert doc["max_file_size"]["bytes"] == 16 * MiB
        assert "video/mp4" in doc["allowed_types"]["value"]
        # "image/*" is allowed there, but not every image/ type: a client can tell before it sends
        assert doc["allowed_types"]["not_matched_by_wildcards"] == ["image/svg", "image/svg+xml"]
        async with s.get(url, headers={"Authorization": f"Bearer {secret}"}) as r:
            assert (await r.json())["enabled"]["value"] is False
        async with s.get(url) as r:
            assert r.status == 401
        # spelled as an upload's path may be (a trailing slash, ``//``, ``.``): the same channel
        for spelling in ("whatsapp/", "./whatsapp", "/whatsapp"):
            async with s.get(
                URL(f"{gateway.url}/_gateway/policy/{spelling}", encoded=True),
                headers={"Authorization": f"Bearer {agent_secret}"},
            ) as r:
                assert (await r.json())["channel"] == "whatsapp", spelling
    assert backend.records() == []


async def test_an_encrypted_channel_key_holds_however_the_client_encodes_the_id(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    tmp_path: Path,
    api_key: str,
    gateway: GatewayProc,
) -> None:
    """SPEC §4: a channel key matches the stream id raw or URL-encoded. An operator copies an
    encrypted id from a URL (``AbC%3D%3D``); one client sends it so, another sends ``AbC==``
    (``=`` needs no escaping in a path) or lowercase hex: the backend decodes all three to the
    same stream, so all three must get that channel's rules, not ``default``'s, and
    ``GET /_gateway/policy/{id}`` must answer what an upload to the same id gets."""
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["channels"]["AbC%3D%3D"] = {"customers": {"enabled": False}}
    (tmp_path / "spool").mkdir()
    strict = start_gateway(config, tmp_path)
    try:
        secret = mint(gateway, api_key, "role=customer")
        auth = {"Authorization": f"Bearer {secret}"}
        body, ctype = multipart([file_part("png")])
        async with aiohttp.ClientSession() as s:
            for stream_id in ("AbC%3D%3D", "AbC==", "AbC%3d%3d", "AbC%3D="):
                backend_proc.clear()
                # encoded=True: sent exactly as written (yarl would turn %3D into = itself)
                url = URL(f"{strict.url}/whatsapp/uploadmedia/{stream_id}", encoded=True)
                headers = {**auth, "Content-Type": ctype}
                async with s.post(url, data=body, headers=headers) as r:
                    status, doc, got = r.status, await r.json(content_type=None), r.headers
                assert_refused(strict, backend_proc, status, doc, got, 403, "uploads_disabled")
                assert doc["channel"] == "AbC%3D%3D", stream_id
                url = URL(f"{strict.url}/_gateway/policy/{stream_id}", encoded=True)
                async with s.get(url, headers=auth) as r:
                    policy = await r.json()
                assert policy["channel"] == "AbC%3D%3D", stream_id
                assert policy["enabled"]["value"] is False, stream_id
    finally:
        strict.stop()


# -- report mode -------------------------------------------------------------------------------


async def test_report_mode_lets_a_would_be_rejection_through_and_counts_it(
    redis_server: RedisServer,
    backend_proc: BackendProc,
    tmp_path: Path,
    api_key: str,
    gateway: GatewayProc,
) -> None:
    config = base_config(redis_server.url, backend_proc.url, tmp_path / "spool")
    config["mode"] = "report"
    reporting = start_gateway(config, tmp_path)
    try:
        backend_proc.clear()
        secret = mint(gateway, api_key, "role=customer")
        status, doc, _, body = await post(reporting, secret, [file_part("docx")])
        assert status == 200, doc
        assert backend_proc.records()[0]["sha256"] == hashlib.sha256(body).hexdigest()
        async with aiohttp.ClientSession() as s, s.get(reporting.admin_url + "/metrics") as r:
            metrics = await r.text()
        assert (
            'upload_gateway_report_mode_would_reject_total{channel="default",'
            'reason="type_not_allowed"} 1.0' in metrics
        )
        assert '"would_reject": "type_not_allowed"' in reporting.log()
        backend_proc.clear()
        status, doc, _, _ = await post(reporting, secret, [file_part("png", 21 * MiB)])
        assert status == 413, "the system cap holds even in report mode"
        assert backend_proc.records() == []
    finally:
        reporting.stop()


async def test_empty_bodies_are_answered_every_time(
    gateway: GatewayProc, backend: BackendProc, api_key: str
) -> None:
    """Requests without a body share aiohttp's one empty reader, whose ``readchunk`` answers
    "end of body" only the first time it is ever asked and "end of an HTTP chunk" after that:
    a reader looping until the body's end must not spin on it (one empty upload would hang the
    worker). Asked again and again, an empty multipart upload is refused (400, no closing
    boundary; the backend gets nothing), so is an empty raw upload (an empty file, which
    this channel lets nobody send: 415), and an empty pass-through request arrives empty."""
    secret = mint(gateway, api_key, "role=agent")
    auth = {"Authorization": f"Bearer {secret}"}
    multipart_type = "multipart/form-data; boundary=b0undary"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for _ in range(3):
            headers = {**auth, "Content-Type": multipart_type}
            async with s.post(gateway.url + UPLOAD, data=b"", headers=headers) as r:
                assert r.status == 400 and (await r.json(content_type=None))["code"] == (
                    "malformed_request"
                )
            assert backend.records() == []
            headers = {**auth, "Content-Type": "application/octet-stream"}
            async with s.post(gateway.url + UPLOAD, data=b"", headers=headers) as r:
                assert r.status == 415 and (await r.json(content_type=None))["code"] == (
                    "type_not_allowed"
                )
            async with s.post(gateway.url + "/t/status/200", data=b"", headers=auth) as r:
                assert r.status == 200
            assert [rec["length"] for rec in backend.records()] == [0]
            backend.clear()
    assert_no_spool_left(gateway)


# -- policy semantics (audit) -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["run.vbs.", "run.vbs "])
async def test_a_script_named_with_a_trailing_dot_or_space_is_still_a_script(
    gateway: GatewayProc, backend: BackendProc, agent_secret: str, name: str
) -> None:
    """Windows saves ``run.vbs.`` as ``run.vbs``: it is refused like ``run.vbs`` (the content
    is text/plain to libmagic, which ``documents`` would admit)."""
    script = b'CreateObject("WScript.Shell").Run "calc"\r\n'
    status, doc, headers, _ = await post(gateway, agent_secret, [("file", name, None, script)])
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["fileName"] == name and doc["fileExtension"] == "vbs"


@pytest.mark.parametrize("how", ["claim", "data_first", "data_last"])
async def test_a_video_too_big_for_customers_is_refused_for_its_type_whoever_says_customer(
    gateway: GatewayProc, backend: BackendProc, api_key: str, how: str
) -> None:
    """12 MB of video from a customer (10 MB, images and PDF only) breaks both rules: the
    answer is the type, known first, however the customer role was stated."""
    video = file_part("mp4", 12 * MiB)
    data = ("data", None, None, json.dumps({"IsManager": False}).encode())
    if how == "claim":
        secret, parts = mint(gateway, api_key, "role=customer"), [video]
    else:
        secret = mint(gateway, api_key)
        parts = [data, video] if how == "data_first" else [video, data]
    status, doc, headers, _ = await post(gateway, secret, parts)
    assert_refused(gateway, backend, status, doc, headers, 415, "type_not_allowed")
    assert doc["role"] == "customer" and doc["sniffed_type"] == "video/mp4"


async def test_a_data_field_sent_first_decides_the_role_of_the_files_in_the_same_chunk(
    gateway: GatewayProc, backend: BackendProc, secret: str
) -> None:
    """WhatsApp customers may not upload: a customer's body whose data field comes first and
    fits in one read with its file gets 403 uploads_disabled, not the verdict of a file whose
    role was still unknown."""
    data = ("data", None, None, json.dumps({"IsManager": False}).encode())
    pic = file_part("pe", name="invoice.pdf", field="pic")
    status, doc, headers, _ = await post(
        gateway, secret, [data, pic], "/whatsapp/uploadmedia/whatsapp"
    )
    assert_refused(gateway, backend, status, doc, headers, 403, "uploads_disabled")
    assert doc["role"] == "customer" and doc["unValidActivity"] == 17

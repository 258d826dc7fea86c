"""The upload stage on real files: types x channels x roles, limits, roles, report mode, spool.

Bodies are fed as chunks from an async generator that records how far it was read (so "cut off
within one chunk" is checked), and once through a real aiohttp server's StreamReader, read by
the handler's ``BodyStream``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.body import BodyStream
from gateway.config.loader import load_config_text
from gateway.config.model import Config, Role
from gateway.errors import GatewayError, problem_body
from gateway.inspect.precheck import precheck_upload
from gateway.inspect.upload import InspectedUpload, inspect_upload
from gateway.metrics import Metrics
from gateway.policy.routes import UploadTarget, match_upload
from gateway.spool import SpoolBudget
from tests.support import files
from tests.test_spool import spool_fds

MiB = 1024 * 1024
Parts = list[tuple[str, str | None, str | None, bytes]]


class Feeder:
    """The body as chunks of ``size``; ``pulled`` counts the bytes handed out."""

    def __init__(self, body: bytes, size: int = 4096) -> None:
        self.body, self.size, self.pulled = body, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.size):
            chunk = self.body[start : start + self.size]
            self.pulled += len(chunk)
            yield chunk


def make_config(tmp_path: Path, **kw: Any) -> Config:
    return load_config_text(files.policy_yaml(str(tmp_path / "spool"), **kw), require_secrets=False)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, memory_threshold="4KiB")


def target(config: Config, channel: str = "default") -> UploadTarget:
    found = match_upload(config, "POST", f"/streams/{channel}/objects")
    assert found is not None
    return found


async def inspect(
    config: Config,
    parts: Parts,
    *,
    channel: str = "default",
    role: Role | None = None,
    chunk: int = 4096,
    metrics: Metrics | None = None,
    headers: Mapping[str, str] | None = None,
    feeder: Feeder | None = None,
) -> InspectedUpload:
    body, content_type = files.multipart(parts)
    claims = {"role": role} if role else {}
    return await inspect_upload(
        feeder or Feeder(body, chunk),
        headers or {"Content-Type": content_type},
        target(config, channel),
        claims,
        config,
        SpoolBudget(10**9),
        metrics,
    )


async def refused(config: Config, parts: Parts, **kw: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        upload = await inspect(config, parts, **kw)
        await upload.aclose()
    assert os.listdir(config.spool.dir) == [] if os.path.isdir(config.spool.dir) else True
    assert spool_fds(Path(config.spool.dir)) == []
    return info.value


async def refused_raw(config: Config, body: bytes, chunk: int = 4096) -> GatewayError:
    """An agent's hand-made multipart body (boundary ``x``), refused."""
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    return await refused(config, [], role="agent", feeder=Feeder(body, chunk), headers=headers)


async def body_of(upload: InspectedUpload) -> bytes:
    return b"".join([chunk async for chunk in upload.chunks()])


def one(
    kind: str,
    name: str | None = None,
    declared: str | None = None,
    size: int | None = None,
    field: str = "file",
) -> tuple[str, str | None, str | None, bytes]:
    return (field, name or files.FILENAMES[kind], declared, files.make(kind, size))


ACCEPTED: dict[tuple[str, Role], set[str]] = {
    ("default", "agent"): {"png", "jpeg", "gif", "pdf", "docx", "xlsx", "zip", "text"},
    ("default", "customer"): {"png", "jpeg", "pdf"},
    ("whatsapp", "agent"): {"png", "jpeg", "gif", "pdf", "mp4", "ogg"},
    ("whatsapp", "customer"): set(),
}


@pytest.mark.parametrize(("channel", "role"), list(ACCEPTED))
@pytest.mark.parametrize("kind", [*files.BUILDERS, "pe-as-pdf"])
async def test_type_matrix(config: Config, kind: str, channel: str, role: Role) -> None:
    part = one("pe", "invoice.pdf", "application/pdf") if kind == "pe-as-pdf" else one(kind)
    if kind in ACCEPTED[(channel, role)]:
        upload = await inspect(config, [part], channel=channel, role=role)
        assert [f.sniffed_type for f in upload.files] == [files.EXPECTED[kind]]
        body, _ = files.multipart([part])
        assert await body_of(upload) == body and upload.content_length == len(body)
        await upload.aclose()
        return
    error = await refused(config, [part], channel=channel, role=role)
    if channel == "whatsapp" and role == "customer":
        assert error.code == "uploads_disabled" and error.status == 403
    elif kind == "pe-as-pdf":
        assert error.code == "type_mismatch"
    else:
        assert error.code == "type_not_allowed"
        assert error.fields["sniffed_type"] == files.EXPECTED[kind]


@pytest.mark.parametrize(
    ("size", "chunk", "held_as"),
    [
        (500, 1 << 20, "bytes"),  # one piece in memory: handed on as it is
        (2000, 700, "pieces"),  # several pieces in memory: iterated, never joined
        (20_000, 4096, "file"),  # past memory_threshold (4 KiB): decrypted from the spool file
    ],
)
async def test_the_body_handed_on_is_exactly_what_arrived_however_it_was_held(
    config: Config, size: int, chunk: int, held_as: str
) -> None:
    parts = [one("png", size=size)]
    sent, _ = files.multipart(parts)
    upload = await inspect(config, parts, role="agent", chunk=chunk)
    try:
        handed = upload.body()
        if isinstance(handed, bytes):
            assert held_as == "bytes"
            received = handed
        else:
            assert held_as == ("file" if upload._spool.on_disk else "pieces")
            received = b"".join([piece async for piece in handed])
        assert received == sent and upload.content_length == len(sent)
    finally:
        await upload.aclose()


@pytest.mark.parametrize(("role", "limit"), [("agent", 1000), ("customer", 500)])
async def test_file_limit_exact_passes_plus_one_fails(
    config: Config, role: Role, limit: int
) -> None:
    ok = await inspect(config, [one("png", size=limit)], channel="small", role=role)
    assert ok.files[0].size == limit
    await ok.aclose()
    error = await refused(config, [one("png", size=limit + 1)], channel="small", role=role)
    assert error.code == "file_too_large" and error.status == 413
    problem = problem_body(error, "rid")
    assert problem["limit_bytes"] == limit
    assert problem["limit_source"] == f"channels.small.{role}s.max_file_size"
    assert (problem["channel"], problem["role"]) == ("small", role)
    assert (problem["fileName"], problem["fileExtension"]) == ("photo.png", "png")
    assert problem["unValidActivity"] == 16 and "maxFileSizeAllow" in problem
    assert problem["detail"].startswith("Refused by the channel's media settings:")


async def test_system_cap_exactly_20mb_passes_one_more_byte_fails(config: Config) -> None:
    upload = await inspect(config, [one("png", size=20 * MiB)], role="agent", chunk=256 * 1024)
    assert upload.files[0].size == 20 * MiB
    await upload.aclose()
    error = await refused(config, [one("png", size=20 * MiB + 1)], role="agent", chunk=256 * 1024)
    assert error.fields["limit_source"] == "limits.max_file_size"
    assert error.fields["maxFileSizeAllow"] == 20
    # SPEC §5: the system cap is the gateway's, not a channel's setting; the detail says so
    assert problem_body(error, "rid")["detail"].startswith("Refused by the upload gateway:")


async def test_request_limit_exact_passes_plus_one_fails(tmp_path: Path) -> None:
    parts = [one("png", size=300), one("gif", size=300)]
    size = len(files.multipart(parts)[0])
    exact = make_config(tmp_path, request=str(size))
    upload = await inspect(exact, parts, role="agent")
    await upload.aclose()
    error = await refused(make_config(tmp_path, request=str(size - 1)), parts, role="agent")
    assert error.code == "request_too_large"
    assert error.fields["limit_source"] == "limits.max_request_size"
    assert problem_body(error, "rid")["detail"].startswith("Refused by the upload gateway:")


async def test_reading_stops_within_one_chunk_of_the_limit(config: Config) -> None:
    body, content_type = files.multipart([one("png", size=5 * MiB)])
    feeder = Feeder(body, 64 * 1024)
    with pytest.raises(GatewayError, match="file_too_large"):
        await inspect(
            config,
            [],
            channel="small",
            role="agent",
            feeder=feeder,
            headers={"Content-Type": content_type},
        )
    assert feeder.pulled <= 1000 + 64 * 1024 + 512


async def test_only_the_last_of_several_files_breaks_a_rule(config: Config) -> None:
    parts = [one("png"), one("jpeg"), one("pdf"), one("gif")]  # gif: not for customers
    error = await refused(config, parts, role="customer")
    assert error.code == "type_not_allowed" and error.fields["fileName"] == "anim.gif"
    parts = [one("png"), one("gif"), one("png", size=600)]
    error = await refused(config, parts, channel="small", role="customer")
    assert error.code == "file_too_large"


async def test_too_many_files(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_files=3)
    upload = await inspect(config, [one("png")] * 3 + [("data", None, None, b"{}")], role="agent")
    await upload.aclose()
    error = await refused(config, [one("png")] * 4, role="agent")
    assert error.code == "too_many_files" and error.fields["limit"] == 3
    assert problem_body(error, "rid")["detail"].startswith("Refused by the upload gateway:")


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    ("marker", "role"),
    [
        (b'{"IsManager": true}', "agent"),
        (b'{"isManager": "true", "x": 1}', "agent"),
        (b'{"IsManager": false}', "customer"),
        (b"not json", "customer"),
        (None, "customer"),
    ],
)
async def test_role_from_the_form_field_anywhere(
    config: Config, where: str, marker: bytes | None, role: Role
) -> None:
    data = [("data", None, None, marker)] if marker is not None else []
    files_ = [one("png"), one("docx")]  # a DOCX: agents only
    parts = data + files_ if where == "before" else files_ + data
    if role == "agent":
        upload = await inspect(config, parts, chunk=100)
        assert upload.role == "agent" and len(upload.files) == 2
        await upload.aclose()
    else:
        error = await refused(config, parts, chunk=100)
        assert error.code == "type_not_allowed" and error.fields["role"] == "customer"


async def test_the_claim_wins_over_the_form(config: Config) -> None:
    parts = [("data", None, None, b'{"IsManager": true}'), one("docx")]
    error = await refused(config, parts, role="customer")
    assert error.code == "type_not_allowed"


async def test_file_over_every_roles_limit_fails_before_the_role_is_known(config: Config) -> None:
    parts = [one("png", size=300_000), ("data", None, None, b'{"IsManager": true}')]
    body, content_type = files.multipart(parts)
    feeder = Feeder(body, 4096)
    with pytest.raises(GatewayError) as info:
        await inspect(
            config, [], channel="small", feeder=feeder, headers={"Content-Type": content_type}
        )
    assert info.value.code == "file_too_large"
    assert info.value.fields["limit_bytes"] == 1000  # agents' limit: over it, over every role
    assert feeder.pulled < 10_000


async def test_uploads_disabled_for_the_role(config: Config) -> None:
    error = await refused(config, [one("png")], channel="whatsapp", role="customer")
    assert error.fields["limit_source"] == "channels.whatsapp.customers.enabled"
    assert problem_body(error, "r")["unValidActivity"] == 17
    parts = [one("png"), ("data", None, None, b'{"IsManager": false}')]
    assert (await refused(config, parts, channel="whatsapp")).code == "uploads_disabled"


async def test_report_mode_counts_and_lets_policy_rejections_through(tmp_path: Path) -> None:
    config = make_config(tmp_path, mode="report")
    metrics = Metrics(CollectorRegistry())
    parts = [one("gif"), one("pe", "invoice.pdf"), one("png", size=10 * MiB + 1), one("png")]
    upload = await inspect(config, parts, role="customer", metrics=metrics, chunk=MiB)
    assert upload.would_reject == "type_not_allowed"
    expected = ["type_not_allowed", "type_mismatch", "file_too_large"]
    assert [e.code for e in upload.reported] == expected
    assert [f.reason for f in upload.files] == [*expected, None]
    assert await body_of(upload) == files.multipart(parts)[0]
    await upload.aclose()
    sample = metrics.registry.get_sample_value
    counted = {"reason": "type_not_allowed", "channel": "default"}
    assert sample("upload_gateway_report_mode_would_reject_total", counted) == 1  # per upload
    # ...but the system's own limits still hold
    error = await refused(config, [one("png", size=20 * MiB + 1)], role="agent", chunk=1024 * 1024)
    assert error.fields["limit_source"] == "limits.max_file_size"


async def test_a_report_mode_channel_in_an_enforcing_gateway(config: Config) -> None:
    upload = await inspect(config, [one("mp4")], channel="tools", role="agent")
    assert upload.would_reject == "type_not_allowed"
    await upload.aclose()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\nabc\r\n--x--\r\n',
            "multipart/form-data",
        ),  # no boundary
        (b"garbage" * 400, "multipart/form-data; boundary=x"),  # no boundary line at all
        (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nab',
            "multipart/form-data; boundary=x",
        ),  # ends before the closing boundary
        (b"--x\r\nX-Bad Header: 1\r\n\r\nabc\r\n--x--\r\n", "multipart/form-data; boundary=x"),
        (
            b"--x\r\n" + b"A: b\r\n" * 20 + b"\r\nabc\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
        ),
        (
            b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
        ),  # no Content-Disposition
        (
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--x--\r\n",
            "multipart/form-data; boundary=x",
        ),
    ],
)
async def test_malformed_bodies_are_400(config: Config, body: bytes, content_type: str) -> None:
    error = await refused(
        config, [], role="agent", feeder=Feeder(body, 7), headers={"Content-Type": content_type}
    )
    assert error.code == "malformed_request" and error.status == 400


async def test_content_encoding_is_refused(config: Config) -> None:
    error = await refused(
        config,
        [one("png")],
        role="agent",
        headers={"Content-Type": "image/png", "Content-Encoding": "gzip"},
    )
    assert error.status == 415 and error.headers == {"Accept-Encoding": "identity"}


async def test_a_filename_star_part_is_still_a_file(config: Config) -> None:
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; '
        b"filename*=UTF-8''tool.png\r\n\r\n" + files.elf() + b"\r\n--x--\r\n"
    )
    error = await refused_raw(config, body)
    assert error.code == "type_mismatch"


@pytest.mark.parametrize("chunk", [1, 3, 64, 1000, 1 << 20])
async def test_the_verdict_does_not_depend_on_chunking(config: Config, chunk: int) -> None:
    tricky = b"--" + b"----gatewaytestboundary7MA4YWxkTrZu0gW"[:-1] + b"\r\n--"  # near-boundary
    parts = [
        ("data", None, None, b'{"IsManager": true}'),
        one("pdf"),
        ("file", "notes.txt", "text/plain", b"hello\r\n" + tricky + b" world"),
        one("docx"),
        one("png", size=3000),
    ]
    upload = await inspect(config, parts, chunk=chunk)
    assert [(f.name, f.sniffed_type, f.size) for f in upload.files] == [
        ("invoice.pdf", "application/pdf", len(files.pdf())),
        ("notes.txt", "text/plain", 7 + len(tricky) + 6),
        ("letter.docx", files.EXPECTED["docx"], len(files.docx())),
        ("photo.png", "image/png", 3000),
    ]
    assert await body_of(upload) == files.multipart(parts)[0]
    await upload.aclose()


async def test_raw_bodies_are_one_file(config: Config) -> None:
    found = match_upload(config, "PUT", "/files/small/photo.png")
    assert found is not None
    headers = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data-binary
    upload = await inspect_upload(
        Feeder(files.make("png", 1000)),
        headers,
        found,
        {"role": "agent"},
        config,
        SpoolBudget(10**9),
        None,
    )
    assert [(f.name, f.sniffed_type, f.size) for f in upload.files] == [
        ("photo.png", "image/png", 1000)
    ]
    await upload.aclose()
    headers = {
        "Content-Type": "application/pdf",
        "Content-Disposition": 'attachment; filename="setup.pdf"',
    }
    with pytest.raises(GatewayError) as info:
        await inspect_upload(
            Feeder(files.pe()),
            headers,
            match_upload(config, "PUT", "/files/whatsapp/x"),
            {"role": "agent"},
            config,
            SpoolBudget(10**9),
            None,
        )
    assert info.value.code == "type_mismatch" and info.value.fields["fileName"] == "setup.pdf"
    with pytest.raises(GatewayError, match="file_too_large"):
        await inspect_upload(
            Feeder(files.make("png", 1001)),
            {},
            found,
            {"role": "agent"},
            config,
            SpoolBudget(10**9),
            None,
        )


async def test_a_cancelled_inspection_leaves_no_spool(tmp_path: Path) -> None:
    config = make_config(tmp_path, memory_threshold="1KiB")
    spool_dir = Path(config.spool.dir)
    gate = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        body, _ = files.multipart([one("png", size=200_000)])
        yield body[:100_000]
        gate.set()
        await asyncio.sleep(3600)
        yield body[100_000:]

    _, content_type = files.multipart([])
    task = asyncio.create_task(
        inspect_upload(
            stalled(),
            {"Content-Type": content_type},
            target(config),
            {"role": "agent"},
            config,
            SpoolBudget(10**9),
            None,
        )
    )
    await gate.wait()
    await asyncio.sleep(0.05)
    assert len(spool_fds(spool_dir)) == 1  # it did spill to an (unlinked) file
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert spool_fds(spool_dir) == [] and os.listdir(spool_dir) == []


async def test_spool_full_is_507(config: Config) -> None:
    body, content_type = files.multipart([one("png", size=50_000)])
    with pytest.raises(GatewayError) as info:
        await inspect_upload(
            Feeder(body),
            {"Content-Type": content_type},
            target(config),
            {"role": "agent"},
            config,
            SpoolBudget(10_000),
            None,
        )
    assert info.value.status == 507


def test_precheck(config: Config) -> None:
    t = target(config)
    with pytest.raises(GatewayError, match="request_too_large"):
        precheck_upload({"Content-Length": str(50 * MiB + 1)}, t, {}, config)
    precheck_upload(
        {"Content-Length": str(50 * MiB), "Content-Type": "multipart/form-data; boundary=x"},
        t,
        {},
        config,
    )
    whatsapp = target(config, "whatsapp")
    with pytest.raises(GatewayError, match="uploads_disabled"):
        precheck_upload({"Content-Type": "image/png"}, whatsapp, {}, config)  # raw: default role
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    precheck_upload(multipart, whatsapp, {}, config)  # agents may: wait for the form
    with pytest.raises(GatewayError, match="uploads_disabled"):
        precheck_upload(multipart, target(config, "closed"), {}, config)
    with pytest.raises(GatewayError, match="uploads_disabled"):
        precheck_upload(multipart, whatsapp, {"role": "customer"}, config)
    small = target(config, "small")
    with pytest.raises(GatewayError, match="file_too_large"):
        precheck_upload({"Content-Length": "1001"}, small, {"role": "agent"}, config)
    precheck_upload({"Content-Length": "1000"}, small, {"role": "agent"}, config)
    with pytest.raises(GatewayError, match="malformed_request"):
        precheck_upload({"Content-Length": "12x"}, small, {}, config)
    with pytest.raises(GatewayError, match="type_not_allowed"):
        precheck_upload({"Content-Encoding": "br"}, small, {}, config)


async def test_through_a_real_aiohttp_stream(config: Config, aiohttp_client: Any) -> None:
    async def handle(request: web.Request) -> web.Response:
        found = match_upload(config, request.method, request.raw_path)
        assert found is not None
        try:
            upload = await inspect_upload(
                BodyStream(request.content, idle_timeout=5),  # the handler's reader
                request.headers,
                found,
                {"role": "agent"},
                config,
                SpoolBudget(10**9),
                None,
            )
        except GatewayError as exc:
            return web.json_response(problem_body(exc, "r"), status=exc.status)
        async with upload:
            received = await body_of(upload)
        return web.json_response(
            {"same": received == await_body[0], "types": [f.sniffed_type for f in upload.files]}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    client: TestClient = await aiohttp_client(app)
    parts = [one("pdf"), one("png", size=200_000)]
    body, content_type = files.multipart(parts)
    await_body = [body]

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 10_000):
            yield body[start : start + 10_000]

    for payload in (body, chunked()):
        response = await client.post(
            "/streams/small/objects", data=payload, headers={"Content-Type": content_type}
        )
        answer = json.loads(await response.text())
        assert response.status == 413 and answer["code"] == "file_too_large"
        response = await client.post(
            "/streams/1/objects",
            data=payload if payload is body else chunked(),
            headers={"Content-Type": content_type},
        )
        answer = json.loads(await response.text())
        assert response.status == 200, answer
        assert answer == {"same": True, "types": ["application/pdf", "image/png"]}


@pytest.mark.parametrize("chunk", [1, 2, 5, 4096])
async def test_the_boundary_inside_a_part_is_found_however_the_body_is_cut(
    config: Config, chunk: int
) -> None:
    """The hidden ``--boundary`` may straddle chunks (and python-multipart's own pieces)."""
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        + files.png()
        + b'\n--x\r\nContent-Disposition: form-data; name="file"; filename="e.exe"\r\n\r\n'
        + files.elf()
        + b"\r\n--x--\r\n"
    )
    error = await refused_raw(config, body, chunk)
    assert error.code == "malformed_request" and "inside a part" in error.detail


async def test_a_duplicate_filename_parameter_is_refused(config: Config) -> None:
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"; '
        b'filename="b.exe"\r\n\r\n' + files.png() + b"\r\n--x--\r\n"
    )
    error = await refused_raw(config, body)
    assert error.code == "malformed_request" and "two filename" in error.detail

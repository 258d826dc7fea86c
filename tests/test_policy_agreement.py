"""One answer for a file that breaks more than one rule (SPEC §4, §5, §2 ``explain``).

The proxy refuses a file for the first rule it breaks as its bytes arrive: its type is known once
its first ``uploads.sniff_bytes`` are in, its size at the limit + 1. That answer — the code, the
limit, the role in the problem body — must not depend on where the role came from (the Secret's
claim, or the ``data`` field sent before the file), nor on how the body was chunked, and
``upload-gateway explain`` must give the same one, or support staff tell a customer to shrink a
video the channel refuses at any size. The proxy runs in-process here (precheck, then the
streaming inspection in 64 KiB chunks, as aiohttp hands them over) on real files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.commands.explain import explain
from gateway.config.loader import load_config_text
from gateway.config.model import Config, Role
from gateway.errors import GatewayError
from gateway.inspect.precheck import precheck_upload
from gateway.inspect.upload import inspect_upload
from gateway.policy.routes import match_upload
from gateway.spool import SpoolBudget
from tests.support import files

MiB = 1024 * 1024


class Chunks:
    """A body in pieces cut at ``cuts`` (every 64 KiB when none are given)."""

    def __init__(self, body: bytes, cuts: list[int] | None = None) -> None:
        self.body = body
        self.cuts = cuts if cuts is not None else list(range(65536, len(body), 65536))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        start = 0
        for cut in [*self.cuts, len(self.body)]:
            yield self.body[start:cut]
            start = cut


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config_text(files.policy_yaml(str(tmp_path / "spool")), require_secrets=False)


def upload_parts(
    role: Role, how: str, part: tuple[str, str, str | None, bytes]
) -> tuple[list[tuple[str, str | None, str | None, bytes]], dict[str, Any]]:
    """The body's parts and the Secret's claims for a role stated by ``how``."""
    if how == "claim":
        return [part], {"role": role}
    data = ("data", None, None, b'{"IsManager": %s}' % (b"true" if role == "agent" else b"false"))
    return ([data, part] if how == "data_first" else [part, data]), {}


async def proxy_answer(
    config: Config,
    channel: str,
    parts: list[tuple[str, str | None, str | None, bytes]],
    claims: dict[str, Any],
    cuts: list[int] | None = None,
) -> GatewayError | None:
    body, ctype = files.multipart(parts)
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    target = match_upload(config, "POST", f"/streams/{channel}/objects")
    assert target is not None
    try:
        precheck_upload(headers, target, claims, config)
        upload = await inspect_upload(
            Chunks(body, cuts), headers, target, claims, config, SpoolBudget(10**10), None
        )
    except GatewayError as error:
        return error
    await upload.aclose()
    return None


def facts_of(error: GatewayError | dict[str, Any] | None) -> tuple[Any, ...]:
    if error is None:
        return ("accepted",)
    fields = error.fields if isinstance(error, GatewayError) else error
    code = error.code if isinstance(error, GatewayError) else error["code"]
    return code, fields.get("limit_bytes"), fields.get("limit_source"), fields.get("role")


CASES = {
    # id: (channel, role, kind, size, name, expected code, limit, also with the data field last)
    "video-over-limit-for-customers": (
        "default", "customer", "mp4", 12 * MiB, "clip.mp4", "type_not_allowed", None, True,
    ),
    "renamed-exe-over-limit": (
        "default", "customer", "pe", 12 * MiB, "invoice.pdf", "type_mismatch", None, False,
    ),
    "docx-over-whatsapp-limit": (
        "whatsapp", "agent", "docx", 17 * MiB, "letter.docx", "type_not_allowed", None, False,
    ),
    "text-over-the-cap": (
        "default", "customer", "text", 21 * MiB, "notes.txt", "type_not_allowed", None, False,
    ),
    "role-limit-crossed-before-the-cap": (
        "small", "agent", "text", 21 * MiB, "notes.txt", "file_too_large", 1000, True,
    ),
    "limit-below-sniff-bytes": (
        "small", "customer", "docx", 1500, "letter.docx", "file_too_large", 500, False,
    ),
    "disabled-role-with-a-renamed-exe": (
        "whatsapp", "customer", "pe", 9000, "invoice.pdf", "uploads_disabled", None, False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_proxy_and_explain_give_one_answer_wherever_the_role_comes_from(
    config: Config, tmp_path: Path, case: str
) -> None:
    """A file that breaks two rules gets the same refusal from a role claim, from the
    ``data`` field sent first (and, where the role is not needed before, last), and from
    ``explain``. The data field sent *after* a file can only be used once it arrives: a file
    over every role's limit, or spoofed, is refused before (README, uploads), so those cases
    are not asked of it."""
    channel, role, kind, size, name, code, limit, late_role = CASES[case]
    data = files.make(kind, size)
    path = tmp_path / "file"
    path.write_bytes(data)
    answer = explain(config, channel, role, str(path), name)
    assert answer["verdict"] == "reject"
    told = facts_of(answer["reason"])
    assert told[0] == code and told[1] == limit, told
    assert told[3] == role
    ways = ["claim", "data_first", *(["data_last"] if late_role else [])]
    for how in ways:
        parts, claims = upload_parts(role, how, ("file", name, None, data))
        got = facts_of(asyncio.run(proxy_answer(config, channel, parts, claims)))
        assert got == told, (how, got, told)


def test_a_data_field_before_the_files_decides_their_role_in_every_chunking(
    config: Config,
) -> None:
    """The platform's clients send ``data`` first: the files after it are judged as its role
    says, whether the data field and the file arrive in one chunk or in several."""
    parts, claims = upload_parts(
        "customer", "data_first", ("pic", "invoice.pdf", None, files.make("pe", 3000))
    )
    body, _ = files.multipart(parts)
    after_data = body.index(b"\r\n--", 10) + 2
    for cuts in ([], [after_data], list(range(700, len(body), 700))):
        error = asyncio.run(proxy_answer(config, "whatsapp", parts, claims, cuts))
        assert error is not None, cuts
        assert (error.code, error.fields["role"]) == ("uploads_disabled", "customer"), cuts


@pytest.mark.parametrize(
    ("kind", "size", "verdict", "code"),
    [
        ("mp4", 12 * MiB, "report", "type_not_allowed"),  # both rules waived: the first counted
        ("text", 21 * MiB, "reject", "file_too_large"),  # the cap holds in report mode
    ],
)
def test_report_mode_counts_and_refuses_what_explain_says(
    config: Config, tmp_path: Path, kind: str, size: int, verdict: str, code: str
) -> None:
    """``tools`` is in ``mode: report``; its customers are the default channel's (10 MB,
    images and PDF): what the proxy lets through it counts under the reason explain gives."""
    data = files.make(kind, size)
    path = tmp_path / files.FILENAMES[kind]
    path.write_bytes(data)
    answer = explain(config, "tools", "customer", str(path))
    assert (answer["verdict"], answer["reason"]["code"]) == (verdict, code)
    body, ctype = files.multipart([("file", files.FILENAMES[kind], None, data)])
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    target = match_upload(config, "POST", "/streams/tools/objects")
    assert target is not None

    async def run() -> str:
        claims = {"role": "customer"}
        try:
            upload = await inspect_upload(
                Chunks(body), headers, target, claims, config, SpoolBudget(10**10), None
            )
        except GatewayError as error:
            return f"reject {error.code} {error.fields['limit_source']}"
        await upload.aclose()
        return f"report {upload.would_reject}"

    expected = f"{verdict} {code}"
    if verdict == "reject":
        expected += f" {answer['reason']['limit_source']}"
    assert asyncio.run(run()) == expected

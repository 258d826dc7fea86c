"""libmagic sniffing of real files, OOXML refinement, and one handle per thread."""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.inspect.sniffer import Sniffer, refine_zip
from gateway.policy import types
from tests.support import files


@pytest.mark.parametrize("kind", list(files.BUILDERS))
def test_every_real_file_is_recognised(kind: str) -> None:
    sniffer = Sniffer()
    assert sniffer.sniff(files.make(kind)[:8192]) == files.EXPECTED[kind]


@pytest.mark.parametrize("kind", [k for k in files.BUILDERS if k != "empty"])
def test_padding_to_an_exact_size_keeps_the_type(kind: str) -> None:
    data = files.make(kind, 100_000)
    assert len(data) == 100_000
    assert Sniffer().sniff(data[:8192]) == files.EXPECTED[kind]


async def test_sniff_async_runs_off_the_loop() -> None:
    assert await Sniffer().sniff_async(files.pdf()) == "application/pdf"
    assert await Sniffer().sniff_async(b"") == types.EMPTY


def test_ooxml_that_libmagic_calls_zip_is_refined_by_its_part_names() -> None:
    # _rels first and a big stored entry before [Content_Types].xml: libmagic sees only a ZIP
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("docProps/app.xml", "<Properties/>")
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<w:document/>")
    head = out.getvalue()[:8192]
    assert refine_zip(head, types.ZIP) == types.DOCX
    assert (
        Sniffer().sniff(head) in (types.DOCX, types.ZIP)
        and refine_zip(head, Sniffer().sniff(head)) == types.DOCX
    )
    assert refine_zip(files.zip_archive(), types.ZIP) == types.ZIP
    assert refine_zip(head, "image/png") == "image/png"


def test_one_sniffer_shared_by_many_threads_gives_right_answers() -> None:
    sniffer = Sniffer()
    kinds = [k for k in files.BUILDERS if k != "empty"] * 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda k: sniffer.sniff(files.make(k)), kinds))
    assert got == [files.EXPECTED[k] for k in kinds]


def test_an_office_package_named_zip_is_judged_as_the_archive_it_is() -> None:
    """A DOCX is a ZIP that may hold anything: named ``.zip`` it is stored and opened as one."""
    head = files.docx()[:8192]
    assert Sniffer().sniff(head, "letter.docx") == types.DOCX
    assert Sniffer().sniff(head, "tools.zip") == types.ZIP

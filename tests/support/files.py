"""Real, small files of every kind the tests need, built byte by byte (no fixtures on disk).

Each builder returns a complete, valid file that libmagic 5.44 recognises as ``EXPECTED[kind]``.
``make(kind, size)`` pads a file to an exact size (with bytes that keep its sniffed type), so
boundary tests can build "exactly N bytes" and "N + 1 bytes" uploads of the real thing.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable

OOXML_WORD = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
OOXML_SHEET = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
OOXML_SLIDES = "application/vnd.openxmlformats-officedocument.presentationml.presentation"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int = 2, height: int = 2) -> bytes:
    """An RGB PNG: signature, IHDR, one zlib IDAT of red pixels, IEND."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def jpeg() -> bytes:
    """A minimal baseline JFIF 8x8 grey image: SOI, APP0, DQT, SOF0, DHT x2, SOS, EOI."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 8, 8, 1) + b"\x01\x11\x00"
    # DC table: one code of length 1 for category 0; AC table: one code of length 1 for EOB.
    dht_dc = b"\xff\xc4" + struct.pack(">H", 20) + b"\x00" + bytes([1] + [0] * 15) + b"\x00"
    dht_ac = b"\xff\xc4" + struct.pack(">H", 20) + b"\x10" + bytes([1] + [0] * 15) + b"\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    scan = b"\x00"  # DC diff 0 (code '0'), EOB (code '0'), padded with zero bits
    return b"\xff\xd8" + app0 + dqt + sof0 + dht_dc + dht_ac + sos + scan + b"\xff\xd9"


def gif() -> bytes:
    """A 1x1 GIF89a with a two-colour palette."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def pdf() -> bytes:
    """A one-page PDF 1.4 with a correct xref table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/{main}" ContentType="{ctype}"/></Types>'
)
_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/officeDocument" Target="{main}"/></Relationships>'
)


def _ooxml(main: str, ctype: str, body: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES.format(main=main, ctype=ctype))
        archive.writestr("_rels/.rels", _RELS.format(main=main))
        archive.writestr(main, body)
    return out.getvalue()


def docx() -> bytes:
    return _ooxml(
        "word/document.xml",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        "<w:body><w:p><w:r><w:t>Hello</w:t></w:r></w:p></w:body></w:document>",
    )


def xlsx() -> bytes:
    return _ooxml(
        "xl/workbook.xml",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
        '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
        "<sheets/></workbook>",
    )


def zip_archive() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("notes/readme.txt", "hello from a zip\n" * 20)
    return out.getvalue()


def mp4() -> bytes:
    """An ISO BMFF file: ``ftyp`` (isom, mp41) then an ``mdat`` box."""
    ftyp_body = b"isom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
    ftyp = struct.pack(">I", 8 + len(ftyp_body)) + b"ftyp" + ftyp_body
    mdat_body = b"\x00" * 16
    return ftyp + struct.pack(">I", 8 + len(mdat_body)) + b"mdat" + mdat_body


def ogg() -> bytes:
    """One Ogg page (BOS) carrying a Vorbis identification header."""
    ident = b"\x01vorbis" + struct.pack("<IBIiii", 0, 1, 44100, 0, 128000, 0) + b"\xb8\x01"
    header = b"OggS\x00\x02" + struct.pack("<qIII", 0, 0x1234, 0, 0) + bytes([1, len(ident)])
    return header + ident  # libmagic does not check the page CRC


def text() -> bytes:
    return b"Hello, this is a plain text note.\nSecond line.\n"


def empty() -> bytes:
    return b""


def svg() -> bytes:
    """A picture with a script in it: what a browser runs when the file is shown inline."""
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
        b'<script>fetch("/steal?c=" + document.cookie)</script>'
        b'<rect width="16" height="16" fill="red"/></svg>\n'
    )


def elf() -> bytes:
    """A minimal 64-bit little-endian x86-64 ELF executable header (plus its program header)."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\x00" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 0x80, 0x80, 0x1000)
    return header + program + b"\xc3" * 8


def pe() -> bytes:
    """A DOS stub whose ``e_lfanew`` points at a PE header for an x86-64 console executable."""
    dos = bytearray(b"MZ" + b"\x90\x00" + b"\x00" * 60)
    struct.pack_into("<I", dos, 0x3C, 0x80)
    dos += b"\x00" * (0x80 - len(dos))
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0xF0, 0x0022)
    optional = bytearray(0xF0)
    struct.pack_into("<HBB", optional, 0, 0x20B, 14, 0)  # PE32+ magic
    struct.pack_into("<H", optional, 68, 3)  # subsystem: Windows console
    section = b".text\x00\x00\x00" + struct.pack(
        "<IIIIIIHHI", 0x10, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020
    )
    body = bytes(dos) + b"PE\x00\x00" + coff + bytes(optional) + section
    return body + b"\x00" * (0x400 - len(body))


BUILDERS: dict[str, Callable[[], bytes]] = {
    "png": png,
    "jpeg": jpeg,
    "gif": gif,
    "pdf": pdf,
    "docx": docx,
    "xlsx": xlsx,
    "zip": zip_archive,
    "mp4": mp4,
    "ogg": ogg,
    "text": text,
    "empty": empty,
    "svg": svg,
    "elf": elf,
    "pe": pe,
}
FILENAMES = {
    "png": "photo.png",
    "jpeg": "photo.jpg",
    "gif": "anim.gif",
    "pdf": "invoice.pdf",
    "docx": "letter.docx",
    "xlsx": "sheet.xlsx",
    "zip": "bundle.zip",
    "mp4": "clip.mp4",
    "ogg": "voice.ogg",
    "text": "notes.txt",
    "empty": "empty.txt",
    "svg": "logo.svg",
    "elf": "tool",
    "pe": "setup.exe",
}
EXPECTED = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "pdf": "application/pdf",
    "docx": OOXML_WORD,
    "xlsx": OOXML_SHEET,
    "zip": "application/zip",
    "mp4": "video/mp4",
    "ogg": "audio/ogg",
    "text": "text/plain",
    "empty": "application/x-empty",
    "svg": "image/svg+xml",
    "elf": "application/x-executable",
    "pe": "application/vnd.microsoft.portable-executable",
}


def make(kind: str, size: int | None = None) -> bytes:
    """The ``kind`` file, padded to exactly ``size`` bytes when given (never truncated)."""
    data = BUILDERS[kind]()
    if size is None:
        return data
    if size < len(data):
        raise ValueError(f"a {kind} file needs at least {len(data)} bytes, asked for {size}")
    filler = b"x" if kind == "text" else b"\x00"
    return data + filler * (size - len(data))


def multipart(
    parts: list[tuple[str, str | None, str | None, bytes]],
    boundary: str = "----gatewaytestboundary7MA4YWxkTrZu0gW",
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body from ``(field, filename, content_type, data)`` parts.

    Returns the body and its Content-Type header. ``filename=None`` makes an ordinary field.
    """
    out = io.BytesIO()
    for field, filename, content_type, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if content_type is not None:
            out.write(f"Content-Type: {content_type}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


POLICY_YAML = """
spool: {{dir: {spool_dir}, memory_threshold: {memory_threshold}, max_bytes: 1GiB}}
mode: {mode}
limits: {{max_file_size: {cap}, max_request_size: {request}, max_files: {max_files}}}
uploads:
  routes:
    - path: /streams/{{channel}}/objects
    - path: /streams/{{channel}}/objects/{{object}}/child
    - path: /whatsapp/uploadmedia/{{channel}}
    - path: /files/{{channel}}/{{filename}}
      methods: [PUT]
  role:
    from_claim: role
    from_form: {{field: data, json_key: IsManager, agent_when: true}}
    default: customer
  sniff_bytes: 8KiB
channels:
  default:
    agents:    {{enabled: true, allowed_types: [images, documents, application/zip]}}
    customers: {{enabled: true, max_file_size: 10MB, allowed_types: [image/png, image/jpeg, .pdf]}}
  whatsapp:
    agents:
      enabled: true
      max_file_size: 16MB
      allowed_types: ["image/*", audio/ogg, video/mp4, .pdf]
    customers: {{enabled: false}}
  small:
    agents:    {{max_file_size: 1000, allowed_types: [images, .pdf, text/plain]}}
    customers: {{max_file_size: 500, allowed_types: [images]}}
  tools:
    mode: report
    agents:    {{allowed_types: [executables, images]}}
  "10020":
    agents:    {{allowed_types: [".exe"]}}
  closed:
    agents:    {{enabled: false}}
    customers: {{enabled: false}}
"""


def policy_yaml(
    spool_dir: str,
    *,
    mode: str = "enforce",
    cap: str = "20MB",
    request: str = "50MB",
    max_files: int = 10,
    memory_threshold: str = "1MiB",
) -> str:
    """The policies file the policy/inspection tests share: SPEC §4's example plus test channels.

    ``small`` has tiny limits for boundary tests; ``tools`` is in report mode and names
    executables; ``10020`` (a numeric stream id) allows ``.exe``; ``closed`` allows nobody.
    """
    return POLICY_YAML.format(
        spool_dir=spool_dir,
        mode=mode,
        cap=cap,
        request=request,
        max_files=max_files,
        memory_threshold=memory_threshold,
    )

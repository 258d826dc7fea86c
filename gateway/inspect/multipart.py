"""Streaming ``multipart/form-data`` inspection with python-multipart's callback parser.

The parser only *reads a copy* of the body: the raw chunks go to the spool untouched, so what the
backend receives is byte-for-byte what the client sent, whatever this module thinks of it. For
each part it keeps only what the rules need: headers, a byte count, the first ``sniff_bytes`` of
a file and the (small) role field; never a whole part.

Every bound an attacker could stretch is enforced here (SPEC §5 ``malformed_request``): bytes
before the first boundary, headers per part (python-multipart: 8 headers of at most ~4 KiB),
the number of non-file fields, the size of the role field, and a body that ends before its
closing boundary.

The backend parses the same bytes with its own parser, and what matters is what *it* will see.
Wherever parsers are known to read one body two ways, the body is refused (400) rather than
guessed at: a boundary given twice or hidden in a quoted parameter (aiohttp and ``email`` take
the first, python-multipart the last), the boundary inside a part's data (Werkzeug and ``email``
end a part at a bare ``LF--boundary``), a part header or a Content-Disposition parameter given
twice, RFC 2231 parameters (``filename*0=`` is a file to aiohttp, Werkzeug and ``email`` and a
plain field to python-multipart; ``name*=`` names the role field for some and not others), and
``filename`` and ``filename*`` naming different files. Browsers send none of these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import GatewayError
from gateway.inspect.occurs import occurs

MAX_PREAMBLE = 1024
MAX_FIELDS = 256
MAX_ROLE_FIELD = 64 * 1024
_IDENTITY_TRANSFER = ("", "7bit", "8bit", "binary")


def malformed(detail: str) -> GatewayError:
    return GatewayError("malformed_request", detail)


def boundary_from(content_type: str, options: dict[bytes, bytes]) -> bytes:
    """The boundary among a Content-Type's parsed parameters, or 400 — also when a parser that
    splits the header on every ``;`` (aiohttp's) would find another one, or more than one."""
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:
        raise malformed("multipart/form-data without a valid boundary (RFC 2046: 1-70 chars)")
    naive = [
        value.strip().strip('"')
        for key, _, value in (segment.partition("=") for segment in content_type.split(";")[1:])
        if key.strip().lower() == "boundary"
    ]
    if naive != [boundary.decode("latin-1")]:
        raise malformed("the Content-Type's boundary is ambiguous (given twice, or quoted)")
    return boundary


@dataclass
class Part:
    """One part as far as it has been read."""

    index: int
    name: str | None
    filename: str | None
    content_type: str | None
    is_file: bool
    size: int = 0
    head: bytearray = field(default_factory=bytearray)  # first sniff_bytes of a file
    value: bytearray | None = None  # the role field's value, kept whole (bounded)
    ended: bool = False
    sniffed: str | None = None  # set by the upload stage
    judged: bool = False  # set by the upload stage once its type was checked
    in_form: bool = True  # False for a raw body: the one file of its request, however empty

    @property
    def ignored(self) -> bool:
        """A browser's empty file input (no name, no bytes) is not a file."""
        return self.in_form and self.ended and self.is_file and not self.filename and self.size == 0


def _decode(raw: bytes) -> str:
    """Header values: UTF-8 as browsers send it, latin-1 when that fails (never an error)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# One ``; key=value`` parameter, the value a quoted string (with escapes) or a bare run.
_PARAMETER = re.compile(r';\s*([^\s;=]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?')


def _disposition(value: str) -> tuple[str | None, str | None, bool]:
    """``(name, filename, is_file)`` from a part's Content-Disposition (:func:`parameters`)."""
    kind, options = parameters(value)
    if kind != b"form-data":
        raise malformed("a part without Content-Disposition: form-data")
    name = options.get(b"name")
    filename = filename_of(value, options)
    return _decode(name) if name is not None else None, filename, filename is not None


# What browsers send: ``form-data`` and quoted values with no quote, backslash or ``;`` inside.
_SIMPLE_DISPOSITION = re.compile(r'form-data(?:; ?[A-Za-z0-9_-]+="[^"\\;]*")+')
_SIMPLE_PARAMETER = re.compile(r'; ?([A-Za-z0-9_-]+)="([^"\\;]*)"')


def parameters(value: str) -> tuple[bytes, dict[bytes, bytes]]:
    """python-multipart's reading of a Content-Disposition, refused (400) where parsers
    disagree: a parameter given twice, and ``*`` parameters other than ``filename*`` (RFC 2231
    continuations, ``name*``)."""
    simple = _simple_parameters(value)
    if simple is not None:
        return b"form-data", simple
    return general_parameters(value)


def _simple_parameters(value: str) -> dict[bytes, bytes] | None:
    """The shape every browser sends, read with one regex: 1.5 instead of 6 us, twice per
    10 KB upload. In it no reading can differ (no quote, backslash or ``;`` in a value, no
    ``*`` or space in a key), so this answers exactly as :func:`general_parameters` does
    wherever it answers at all (``tests/test_multipart.py``); anything else goes there."""
    if _SIMPLE_DISPOSITION.fullmatch(value) is None:
        return None
    found = _SIMPLE_PARAMETER.findall(value)
    # back to the bytes as received (aiohttp keeps undecodable ones as surrogates)
    options = {
        key.lower().encode("latin-1"): raw.encode("utf-8", "surrogateescape") for key, raw in found
    }
    return options if len(options) == len(found) else None  # a key twice: the general path


def general_parameters(value: str) -> tuple[bytes, dict[bytes, bytes]]:
    """:func:`parameters` for any Content-Disposition, through python-multipart's parser."""
    keys = [key.lower() for key, _ in _PARAMETER.findall(value)]
    for key in keys:
        if keys.count(key) > 1:
            raise malformed(f"a Content-Disposition with two {key} parameters")
        if "*" in key and key != "filename*":
            raise malformed(f"Content-Disposition parameter {key} (RFC 2231) is not accepted")
    # back to the bytes as received (aiohttp keeps undecodable ones as surrogates)
    kind, options = parse_options_header(value.encode("utf-8", "surrogateescape").decode("latin-1"))
    return bytes(kind), options


def filename_of(value: str, options: dict[bytes, bytes]) -> str | None:
    """The file's name; ``filename*`` counts (RFC 5987), and must agree with ``filename``.

    python-multipart ignores ``filename*`` (RFC 7578 forbids it in form-data), but backends
    honour it, and prefer it: a part carrying only ``filename*`` is still a file and must be
    inspected as one, and one carrying both must not be checked under the other name.
    """
    filename = options.get(b"filename")
    text = _decode(filename) if filename is not None else None
    if "*" not in value:
        return text
    for key, raw in _PARAMETER.findall(value):
        if key.lower() == "filename*":
            extended = unquote(raw.strip().strip('"').split("''", 1)[-1])
            if text is not None and extended != text:
                raise malformed("filename and filename* name different files")
            return extended
    return text


class MultipartInspector:
    """Feed it raw chunks; it reports the parts each chunk touched."""

    def __init__(self, boundary: bytes, sniff_bytes: int, role_field: str | None) -> None:
        self._sniff_bytes = sniff_bytes
        self._role_field = role_field
        # The parser holds bound methods of this object: a reference cycle, broken by close().
        self._parser: MultipartParser | None = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        self.files: list[Part] = []
        self.role_value: bytes | None = None
        self.fields = 0
        self.complete = False
        self._fed = 0
        self._started = False
        self._headers: list[tuple[str, str]] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._current: Part | None = None
        self._touched: dict[int, Part] = {}
        self._role_parts = 0
        self._empty_inputs = 0  # file parts that ended ignored (Part.ignored)
        self._delimiter = b"--" + boundary
        self._tail = b""  # the last bytes of the current part's data, for a delimiter cut in two

    # -- the parser's callbacks: record, never await ------------------------------------------

    def _on_part_begin(self) -> None:
        self._started = True
        self._headers = []
        self._current = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = bytes(self._header_name).decode("latin-1").strip().lower()
        self._headers.append((name, _decode(bytes(self._header_value)).strip()))
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        headers: dict[str, str] = {}
        for header, value in self._headers:
            if header in headers:  # parsers disagree on which one counts
                raise malformed(f"a part with two {header} headers")
            headers[header] = value
        if "content-disposition" not in headers:
            raise malformed("a part without Content-Disposition")
        encoding = headers.get("content-transfer-encoding", "").lower()
        if encoding not in _IDENTITY_TRANSFER:
            raise malformed(f"Content-Transfer-Encoding {encoding} in form-data (RFC 7578 §4.7)")
        name, filename, is_file = _disposition(headers["content-disposition"])
        part = Part(len(self.files), name, filename, headers.get("content-type"), is_file)
        if is_file:
            self.files.append(part)
            self._touched[id(part)] = part
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise malformed(f"more than {MAX_FIELDS} form fields")
            if name is not None and name == self._role_field:
                part.value = bytearray()
        if name is not None and name == self._role_field:
            self._role_parts += 1
            if self._role_parts > 1:  # some backends read the first, others the last
                raise malformed(f"form field {name!r} (the role) given twice")
        self._current = part
        self._tail = b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._refuse_hidden_delimiter(data, start, end)
        part = self._current
        if part is None:
            return
        part.size += end - start
        if part.is_file:
            room = self._sniff_bytes - len(part.head)
            if room > 0:
                part.head += data[start : min(end, start + room)]
            self._touched[id(part)] = part
        elif part.value is not None:
            if part.size > MAX_ROLE_FIELD:
                raise malformed(f"form field {part.name!r} is over {MAX_ROLE_FIELD} bytes")
            part.value += data[start:end]

    def _refuse_hidden_delimiter(self, data: bytes, start: int, end: int) -> None:
        """``--boundary`` inside a part's data (RFC 2046: it must not occur there) is a part
        boundary to Werkzeug and ``email`` when a bare LF precedes it, and data to us."""
        keep = len(self._delimiter) - 1
        if occurs(self._delimiter, data, start, end):
            raise malformed("the multipart boundary occurs inside a part's data")
        if self._tail and self._delimiter in self._tail + data[start : start + keep]:
            raise malformed("the multipart boundary occurs inside a part's data")
        if end - start >= keep:
            self._tail = data[end - keep : end]
        else:
            self._tail = (self._tail + data[start:end])[-keep:]

    def _on_part_end(self) -> None:
        part = self._current
        if part is not None:
            part.ended = True
            if part.ignored:
                # An empty file input counts against neither max_files nor the file rules, so
                # it counts as a field: unbounded, each would cost a Part for the whole request.
                self.fields += 1
                if self.fields > MAX_FIELDS:
                    raise malformed(f"more than {MAX_FIELDS} form fields")
                self._empty_inputs += 1
            if part.is_file:
                self._touched[id(part)] = part
            elif part.value is not None and self.role_value is None:
                self.role_value = bytes(part.value)
        self._current = None

    def _on_end(self) -> None:
        self.complete = True

    # -- the interface ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> list[Part]:
        """Parse ``chunk``; the file parts that began, grew or ended in it, in order."""
        self._touched = {}
        assert self._parser is not None, "feed() after close()"
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise malformed(f"bad multipart framing: {exc}") from None
        self._fed += len(chunk)
        if not self._started and self._fed > MAX_PREAMBLE:
            raise malformed(f"no multipart boundary in the first {MAX_PREAMBLE} bytes")
        return list(self._touched.values())

    def finish(self) -> None:
        """At the end of the body: it must have closed with the final boundary."""
        if not self.complete:
            raise malformed("the body ended before the closing multipart boundary")

    def close(self) -> None:
        """Let go of the parser, on every way out of the inspection.

        Its callbacks are this object's bound methods, so the two form a reference cycle, and
        everything they hold (the parts with their sniffed heads, up to ``sniff_bytes`` each)
        would wait for the garbage collector instead of going when the upload's inspection
        ends: one such cycle per upload was what set off most of a worker's collections
        (``gateway/collector.py``)."""
        self._parser = None

    @property
    def file_count(self) -> int:
        return len(self.files) - self._empty_inputs  # asked after every chunk: no scan

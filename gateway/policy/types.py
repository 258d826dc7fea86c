"""What the gateway knows about file types: the named groups, extensions, and type families.

The groups of SPEC §4 (``images``, ``documents``, ``audio``, ``video``, ``archives``) and
``executables`` are defined here and nowhere else. Everything works on the MIME type libmagic
sniffs from content; extensions and declared types only ever *confirm* it (spoofing check) or
select it (``.pdf`` in ``allowed_types`` means "content that is a PDF").
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

OCTET_STREAM = "application/octet-stream"
EMPTY = "application/x-empty"
ZIP = "application/zip"
NO_CLAIM = frozenset(
    {
        OCTET_STREAM,
        EMPTY,
        "application/unknown",
        "*/*",
        # What `curl --data-binary @file` sends unless told otherwise: a default, not a claim.
        "application/x-www-form-urlencoded",
    }
)
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"

EXECUTABLE_TYPES = frozenset(
    {
        "application/x-executable",
        "application/x-pie-executable",
        "application/x-sharedlib",
        "application/x-elf",
        "application/x-mach-binary",
        "application/x-dosexec",
        "application/x-msdownload",
        "application/x-ms-installer",
        "application/x-msi",
        "application/vnd.microsoft.portable-executable",
        "application/java-archive",
        "application/x-java-applet",
        "text/x-shellscript",
        "text/x-msdos-batch",
    }
)
"""Content that runs. Blocked on every channel unless a rule names it explicitly (SPEC §4)."""

EXECUTABLE_EXTENSIONS = frozenset(
    {
        # Windows runs these on a double click, whatever their bytes look like to libmagic
        # (a .vbs or .js is text/plain to it, and "documents" admits text/plain).
        *(".exe", ".dll", ".com", ".scr", ".pif", ".cpl", ".msi", ".msp", ".lnk", ".reg"),
        *(".bat", ".cmd", ".vbs", ".vbe", ".js", ".jse", ".wsf", ".wsh", ".hta", ".msc"),
        *(".ps1", ".psm1", ".psd1", ".jar", ".apk", ".app", ".sh", ".elf", ".so"),
        # and a web server runs these when the backend stores them where it serves files
        *(".php", ".phtml", ".phar", ".asp", ".aspx", ".jsp", ".cgi"),
    }
)
"""Names that run: a file called so is an executable whatever its content (blocked unless a
channel names the extension or ``executables``)."""

SCRIPTABLE_TYPES = frozenset({"image/svg+xml", "image/svg"})
"""Pictures that can carry scripts a browser runs when the platform shows the file inline (an
SVG's ``<script>`` and event handlers: stored XSS). Like executables, only entries that name
them admit them: ``image/*`` and ``images`` mean pictures that are only pictures."""

OFFICE_TYPES = frozenset(
    {
        "application/msword",
        DOCX,
        XLSX,
        PPTX,
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
        "application/vnd.ms-office",
        "application/cdfv2",
        "application/x-ole-storage",
        "application/rtf",
        "text/rtf",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/vnd.oasis.opendocument.presentation",
    }
)
ARCHIVE_TYPES = frozenset(
    {
        ZIP,
        "application/x-tar",
        "application/gzip",
        "application/x-gzip",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-7z-compressed",
        "application/x-rar",
        "application/vnd.rar",
        "application/zstd",
    }
)

GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "images": ("image/*",),
        "documents": ("application/pdf", "text/plain", "text/csv", *sorted(OFFICE_TYPES)),
        "audio": ("audio/*",),
        "video": ("video/*",),
        "archives": tuple(sorted(ARCHIVE_TYPES)),
        "executables": tuple(sorted(EXECUTABLE_TYPES)),
    }
)
"""Named groups usable in ``allowed_types``; wildcards never match an executable."""

ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "image/jpg": "image/jpeg",
        "image/pjpeg": "image/jpeg",
        "image/x-png": "image/png",
        "audio/x-wav": "audio/wav",
        "audio/wave": "audio/wav",
        "audio/mp3": "audio/mpeg",
        "audio/x-mpeg": "audio/mpeg",
        "audio/x-m4a": "audio/mp4",
        "application/x-zip-compressed": ZIP,
        "application/x-zip": ZIP,
        "application/x-pdf": "application/pdf",
        "application/x-gzip": "application/gzip",
        "application/x-rar-compressed": "application/vnd.rar",
        "application/x-rar": "application/vnd.rar",
        "text/x-csv": "text/csv",
        "application/csv": "text/csv",
        "application/x-msdownload": "application/vnd.microsoft.portable-executable",
        "application/x-dosexec": "application/vnd.microsoft.portable-executable",
        "binary/octet-stream": OCTET_STREAM,
    }
)

EXTENSIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        ext: frozenset(types)
        for ext, types in {
            ".png": {"image/png"},
            ".jpg": {"image/jpeg"},
            ".jpeg": {"image/jpeg"},
            ".jpe": {"image/jpeg"},
            ".jfif": {"image/jpeg"},
            ".gif": {"image/gif"},
            ".webp": {"image/webp"},
            ".bmp": {"image/bmp", "image/x-ms-bmp"},
            ".tif": {"image/tiff"},
            ".tiff": {"image/tiff"},
            ".heic": {"image/heic"},
            ".heif": {"image/heif"},
            ".svg": {"image/svg+xml", "image/svg"},
            ".ico": {"image/vnd.microsoft.icon"},
            ".pdf": {"application/pdf"},
            ".doc": {"application/msword", "application/cdfv2", "application/x-ole-storage"},
            ".docx": {DOCX},
            ".xlsx": {XLSX},
            ".pptx": {PPTX},
            ".xls": {"application/vnd.ms-excel", "application/cdfv2", "application/x-ole-storage"},
            ".ppt": {
                "application/vnd.ms-powerpoint",
                "application/cdfv2",
                "application/x-ole-storage",
            },
            ".odt": {"application/vnd.oasis.opendocument.text"},
            ".ods": {"application/vnd.oasis.opendocument.spreadsheet"},
            ".odp": {"application/vnd.oasis.opendocument.presentation"},
            ".rtf": {"text/rtf", "application/rtf"},
            ".txt": {"text/plain"},
            ".csv": {"text/csv", "text/plain"},
            ".json": {"application/json", "text/plain"},
            ".xml": {"text/xml", "application/xml"},
            ".html": {"text/html"},
            ".htm": {"text/html"},
            ".xhtml": {"application/xhtml+xml", "text/html", "text/xml", "application/xml"},
            ".xht": {"application/xhtml+xml", "text/html", "text/xml", "application/xml"},
            ".shtml": {"text/html"},
            ".zip": {ZIP},
            ".gz": {"application/gzip"},
            ".tgz": {"application/gzip"},
            ".tar": {"application/x-tar"},
            ".7z": {"application/x-7z-compressed"},
            ".rar": {"application/vnd.rar"},
            ".bz2": {"application/x-bzip2"},
            ".xz": {"application/x-xz"},
            ".mp3": {"audio/mpeg"},
            ".ogg": {"audio/ogg"},
            ".oga": {"audio/ogg"},
            ".opus": {"audio/ogg"},
            ".wav": {"audio/wav"},
            ".m4a": {"audio/mp4", "video/mp4"},
            ".aac": {"audio/aac"},
            ".amr": {"audio/amr"},
            ".flac": {"audio/flac"},
            ".mp4": {"video/mp4"},
            ".m4v": {"video/mp4", "video/x-m4v"},
            ".mov": {"video/quicktime"},
            ".webm": {"video/webm"},
            ".3gp": {"video/3gpp"},
            ".avi": {"video/x-msvideo"},
            ".mkv": {"video/x-matroska"},
            ".exe": {"application/vnd.microsoft.portable-executable"},
            ".dll": {"application/vnd.microsoft.portable-executable"},
            ".msi": {"application/x-msi", "application/x-ole-storage", "application/cdfv2"},
            ".sh": {"text/x-shellscript"},
            ".bat": {"text/x-msdos-batch"},
            ".jar": {"application/java-archive"},
            ".elf": {"application/x-executable"},
            ".so": {"application/x-sharedlib"},
        }.items()
    }
)
"""Which sniffed types each known extension stands for."""


def normalise(mime: str | None) -> str:
    """Lower-case, parameters dropped, aliases resolved: ``Image/JPG; q=1`` -> ``image/jpeg``."""
    if not mime:
        return ""
    base = mime.split(";", 1)[0].strip().lower()
    return ALIASES.get(base, base)


def extension_of(filename: str | None) -> str:
    """``.pdf`` for ``Invoice.PDF``; ``""`` when there is none (dot-files have none either).

    Trailing dots and spaces do not hide an extension: Windows drops them when it saves a file
    (``run.vbs.`` is saved as ``run.vbs``), and so do filename sanitisers such as Werkzeug's
    ``secure_filename``. Read literally, such a name claims nothing and its content alone is
    judged: a ``.vbs`` that libmagic calls text/plain would pass as a document.
    """
    if not filename:
        return ""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].rstrip(". ")
    stem, dot, ext = base.rpartition(".")
    return f".{ext.lower()}" if dot and stem and ext else ""


def as_named(sniffed: str, extension: str) -> str:
    """An OOXML package named ``.zip`` is judged as the ZIP archive it also is.

    A DOCX is a ZIP holding ``[Content_Types].xml`` and ``word/``, and any other entries too:
    sent as ``tools.zip``, it is stored and opened as an archive, so a channel that admits
    documents but not archives must not admit it as a document."""
    if extension == ".zip" and sniffed in (DOCX, XLSX, PPTX):
        return ZIP
    return sniffed


def is_executable(mime: str) -> bool:
    return normalise(mime) in EXECUTABLE_TYPES or mime in EXECUTABLE_TYPES


def is_scriptable(mime: str) -> bool:
    return normalise(mime) in SCRIPTABLE_TYPES


def family(mime: str) -> str | None:
    """The coarse kind of content, for the spoofing check; ``None`` means "no evidence".

    Why families and not exact types: clients label files loosely (a JPEG saved as ``.png``, an
    ``.m4a`` voice note sniffed as ``video/mp4``, a ``.csv`` sniffed as ``text/plain``) and
    refusing those would break real users. What must never pass is a change of *kind*, above all
    executable content under a harmless name, and every executable is its own family.
    """
    mime = normalise(mime)
    if not mime or mime in NO_CLAIM:
        return None
    if mime in EXECUTABLE_TYPES:
        return "executable"
    if mime in OFFICE_TYPES:
        return "office"
    if mime in ARCHIVE_TYPES:
        return "archive"
    top = mime.split("/", 1)[0]
    if top in ("audio", "video"):
        return "media"  # an audio-only MP4 or WebM sniffs as video/*
    if top in ("image", "text"):
        return top
    if mime in ("application/json", "application/xml", "application/javascript"):
        return "text"
    return mime


def compatible(claimed: str, sniffed: str) -> bool:
    """Whether a declared type or extension-implied type agrees with the sniffed content.

    ``application/octet-stream`` (or nothing) claims nothing, and content libmagic cannot place
    contradicts nothing. Office OOXML/ODF files are ZIP containers, so ZIP and Office agree both
    ways (a DOCX sent as ``application/zip``; a DOCX whose first bytes did not show its parts).
    """
    claimed_family, sniffed_family = family(claimed), family(sniffed)
    if claimed_family is None or sniffed_family is None:
        return True
    if claimed_family == sniffed_family:
        return True
    zip_like = {normalise(claimed), normalise(sniffed)} & {ZIP}
    return bool(zip_like) and {claimed_family, sniffed_family} == {"archive", "office"}


def extension_compatible(extension: str, sniffed: str) -> bool:
    """An unknown extension claims nothing; a known one must share a family with the content."""
    types = EXTENSIONS.get(extension)
    if not types:
        return True
    if normalise(sniffed) in types:
        return True
    return any(compatible(claimed, sniffed) for claimed in types)


def matches_entry(entry: str, sniffed: str, extension: str) -> bool:
    """Does one ``allowed_types`` entry admit content of type ``sniffed`` named ``...extension``?

    Executables only match entries that name them exactly (the group, the MIME type, or the
    extension): ``application/*`` or ``*/*`` must not open a channel to programs by accident.
    Nor do wildcards match :data:`SCRIPTABLE_TYPES` (SVG): ``image/svg+xml`` or ``.svg`` do.
    A file *named* as something that runs (:data:`EXECUTABLE_EXTENSIONS`) is one, whatever its
    content: only ``executables`` or its own extension admit it.
    """
    entry = entry.strip().lower()
    mime = normalise(sniffed)
    executable = is_executable(mime)
    if extension in EXECUTABLE_EXTENSIONS and not executable:
        return entry in ("executables", extension)
    if entry in GROUPS:
        return any(matches_entry(member, sniffed, extension) for member in GROUPS[entry]) or (
            entry == "executables" and executable
        )
    if entry.startswith("."):
        known = EXTENSIONS.get(entry)
        if known is not None:
            return mime in known
        return entry == extension and not executable
    if entry.endswith("/*"):
        return not executable and not is_scriptable(mime) and mime.startswith(entry[:-1])
    return normalise(entry) == mime


def wildcard_exceptions(expanded: list[str]) -> list[str]:
    """The types an ``x/*`` entry among ``expanded`` (allowed types, groups spelled out) looks
    as if it admitted but :func:`matches_entry` does not (executables, scripts in pictures),
    unless another entry names them: for the policy document a client reads."""
    prefixes = tuple(entry[:-1] for entry in expanded if entry.endswith("/*"))
    if not prefixes:
        return []
    named = set(expanded).union(*(EXTENSIONS.get(entry, ()) for entry in expanded))
    never = (EXECUTABLE_TYPES | SCRIPTABLE_TYPES) - named
    return sorted(mime for mime in never if mime.startswith(prefixes))

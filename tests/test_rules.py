"""Effective limits with their sources, and the verdict for real files (SPEC §4, §5)."""

from __future__ import annotations

import gc

import pytest

from gateway.config.loader import load_config_text
from gateway.config.model import Config, Role
from gateway.errors import GatewayError
from gateway.inspect.sniffer import Sniffer
from gateway.policy import rules, types
from tests.support import files

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config_text(files.policy_yaml("/tmp/gw-spool"), require_secrets=False)


def facts(kind: str, name: str | None = None, declared: str | None = None) -> rules.FileFacts:
    data = files.make(kind)
    return rules.FileFacts(
        name or files.FILENAMES[kind], declared, Sniffer().sniff(data), len(data)
    )


ACCEPTED: dict[tuple[str, Role], set[str]] = {
    ("default", "agent"): {"png", "jpeg", "gif", "pdf", "docx", "xlsx", "zip", "text"},
    ("default", "customer"): {"png", "jpeg", "pdf"},
    ("whatsapp", "agent"): {"png", "jpeg", "gif", "pdf", "mp4", "ogg"},
    ("whatsapp", "customer"): set(),
    ("10020", "agent"): {"pe"},
}


@pytest.mark.parametrize(("channel", "role"), list(ACCEPTED))
@pytest.mark.parametrize("kind", list(files.BUILDERS))
def test_type_matrix(config: Config, kind: str, channel: str, role: Role) -> None:
    policy = rules.effective_policy(config, channel, role)
    error = rules.judge_file(policy, facts(kind))
    if kind in ACCEPTED[(channel, role)]:
        assert error is None
    elif not policy.enabled:
        assert error is not None and error.code == "uploads_disabled"
        assert error.fields["limit_source"] == "channels.whatsapp.customers.enabled"
    else:
        assert error is not None and error.code == "type_not_allowed", error
        assert error.fields["sniffed_type"] == files.EXPECTED[kind]
        assert error.fields["allowed_types"] == list(policy.allowed_types)
        assert error.status == 415


@pytest.mark.parametrize(
    ("channel", "role"),
    [("default", "agent"), ("whatsapp", "agent"), ("10020", "agent"), ("tools", "agent")],
)
@pytest.mark.parametrize("kind", ["pe", "elf"])
def test_an_executable_renamed_pdf_is_spoofing_everywhere(
    config: Config, kind: str, channel: str, role: Role
) -> None:
    error = rules.judge_file(
        rules.effective_policy(config, channel, role), facts(kind, "invoice.pdf", "application/pdf")
    )
    assert error is not None and error.code == "type_mismatch"
    assert error.fields["fileName"] == "invoice.pdf" and error.fields["fileExtension"] == "pdf"


@pytest.mark.parametrize(
    ("kind", "name", "declared"),
    [
        ("png", "photo.jpg", "image/jpeg"),  # an image saved under another image type: same family
        ("jpeg", "photo", "application/octet-stream"),  # octet-stream claims nothing
        ("docx", "letter.docx", "application/zip"),  # OOXML is a ZIP container
        ("zip", "letter.docx", None),  # an OOXML file whose first bytes did not show its parts
        ("text", "data.csv", "text/csv"),
        ("pdf", "scan.PDF", "application/pdf; charset=binary"),
        ("png", "photo.unknownext", "image/png"),
        ("ogg", "voice.m4a", None),  # audio and video are one family
    ],
)
def test_loose_but_consistent_names_are_not_spoofing(
    kind: str, name: str, declared: str | None
) -> None:
    assert rules.check_spoofing(facts(kind, name, declared)) is None


@pytest.mark.parametrize(
    ("kind", "name", "declared"),
    [
        ("pe", "photo.png", None),
        ("pe", "photo", "image/png"),
        ("text", "photo.png", None),
        ("pdf", "photo.jpg", "image/jpeg"),
        ("png", "invoice.pdf", None),
        ("zip", "photo.png", None),
    ],
)
def test_contradicting_names_or_declared_types_are_spoofing(
    kind: str, name: str, declared: str | None
) -> None:
    error = rules.check_spoofing(facts(kind, name, declared))
    assert error is not None and error.code == "type_mismatch" and error.status == 415


def test_executables_only_where_named(config: Config) -> None:
    for entry in ("*/*", "application/*", "images", "archives"):
        assert not types.matches_entry(entry, files.EXPECTED["pe"], ".exe")
    for entry in (
        "executables",
        ".exe",
        "application/vnd.microsoft.portable-executable",
        "application/x-dosexec",
    ):
        assert types.matches_entry(entry, files.EXPECTED["pe"], ".exe")
    tools = rules.effective_policy(config, "tools", "agent")
    assert rules.judge_file(tools, facts("elf")) is None


def test_a_scriptable_picture_only_where_named(config: Config) -> None:
    """An SVG can carry a script a browser runs when the platform shows it inline: ``images``
    and ``image/*`` mean pictures that are only pictures; naming the type or ``.svg`` admits it."""
    svg = files.EXPECTED["svg"]
    for entry in ("images", "image/*", "*/*"):
        assert not types.matches_entry(entry, svg, ".svg")
    for entry in ("image/svg+xml", ".svg"):
        assert types.matches_entry(entry, svg, ".svg")
    error = rules.judge_file(rules.effective_policy(config, "default", "agent"), facts("svg"))
    assert error is not None and error.code == "type_not_allowed"
    assert "can carry scripts" in error.detail and "image/svg+xml or .svg" in error.detail


@pytest.mark.parametrize(
    ("allowed", "exceptions"),
    [
        (["image/*", ".pdf"], ["image/svg", "image/svg+xml"]),
        (["image/*", ".svg"], []),  # named by its extension: admitted after all
        (["image/png", "application/pdf"], []),  # no wildcard, nothing to except
        (
            ["application/*"],
            sorted(m for m in types.EXECUTABLE_TYPES if m.startswith("application/")),
        ),
        (["application/*", *types.GROUPS["executables"]], []),
    ],
)
def test_the_policy_document_names_what_its_wildcards_do_not_admit(
    allowed: list[str], exceptions: list[str]
) -> None:
    """A client building ``accept="image/*"`` from ``GET /_gateway/policy`` would let an SVG
    through to a 415; the document lists such types, each of which the rules really refuse."""
    assert types.wildcard_exceptions(allowed) == exceptions
    for mime in exceptions:
        assert not any(types.matches_entry(entry, mime, "") for entry in allowed)


def test_sizes_and_where_they_come_from(config: Config) -> None:
    whatsapp = rules.effective_policy(config, "whatsapp", "agent")
    assert (whatsapp.max_file_size, whatsapp.max_file_size_source) == (
        16 * MiB,
        "channels.whatsapp.agents.max_file_size",
    )
    default_agent = rules.effective_policy(config, "no-such-channel", "agent")
    assert default_agent.channel == "default"
    assert (default_agent.max_file_size, default_agent.max_file_size_source) == (
        20 * MiB,
        "limits.max_file_size",
    )
    # 'tools' leaves customers out: they are the default channel's, and say so
    inherited = rules.effective_policy(config, "tools", "customer")
    assert inherited.max_file_size_source == "channels.default.customers.max_file_size"
    assert inherited.allowed_types_source == "channels.default.customers.allowed_types"
    assert (inherited.mode, inherited.mode_source) == ("report", "channels.tools.mode")
    assert rules.effective_policy(config, "small", "agent").mode_source == "mode"


@pytest.mark.parametrize(
    ("num_bytes", "shown"),
    [
        (20 * MiB, 20),
        (MiB, 1),
        (10 * MiB + MiB // 2, 10.5),
        (MiB + 1, 1.0),
        (2000, 0.0019),
        (1, 9.5e-07),
    ],
)
def test_max_file_size_allow_is_megabytes_and_never_rounds_a_limit_to_zero(
    num_bytes: int, shown: float
) -> None:
    assert rules.megabytes(num_bytes) == shown


def test_exactly_the_limit_passes_one_more_byte_fails(config: Config) -> None:
    policy = rules.effective_policy(config, "small", "customer")
    assert rules.check_size(policy, 500, "a.png") is None
    error = rules.check_size(policy, 501, "a.png")
    assert error is not None and error.code == "file_too_large" and error.status == 413
    assert error.fields == {
        "limit_bytes": 500,
        "limit_source": "channels.small.customers.max_file_size",
        "maxFileSizeAllow": 0.00048,  # never 0.0: a client shows it to the user
        "channel": "small",
        "role": "customer",
        "fileName": "a.png",
        "fileExtension": "png",
    }
    whatsapp = rules.check_size(
        rules.effective_policy(config, "whatsapp", "agent"), 16 * MiB + 1, "v.mp4"
    )
    assert whatsapp is not None and whatsapp.fields["maxFileSizeAllow"] == 16


def test_report_mode_waives_channel_rules_not_system_limits(config: Config) -> None:
    policy = rules.effective_policy(config, "small", "customer")
    channel_error = rules.check_size(policy, 501, "a.png")
    cap_error = rules.file_too_large(rules.capped(policy), "a.png")
    assert channel_error is not None
    assert not rules.enforced(channel_error, "report")
    assert rules.enforced(channel_error, "enforce")
    assert rules.enforced(cap_error, "report")
    assert rules.enforced(GatewayError("too_many_files", "x"), "report")
    assert rules.enforced(GatewayError("malformed_request", "x"), "report")


def test_policy_document_shape(config: Config) -> None:
    document = rules.effective_policy(config, "whatsapp", "agent").as_dict()
    assert document["max_file_size"] == {
        "bytes": 16 * MiB,
        "source": "channels.whatsapp.agents.max_file_size",
    }
    assert document["allowed_types"]["value"] == ["image/*", "audio/ogg", "video/mp4", ".pdf"]
    assert document["enabled"]["value"] is True


def test_policies_are_remembered_per_channel_key_and_forgotten_with_their_config() -> None:
    """URL ids are client-chosen: the memo is keyed by the channel they resolve to."""
    config = load_config_text(files.policy_yaml("/tmp/gw-spool"), require_secrets=False)
    first = rules.effective_policy(config, "4711", "agent")
    for stream in range(500):
        assert rules.effective_policy(config, f"stream-{stream}", "agent") is first
    assert rules.effective_policy(config, "whatsapp", "agent").channel == "whatsapp"
    assert set(rules._memo(config)) == {("default", "agent"), ("whatsapp", "agent")}
    key = id(config)
    del config, first
    gc.collect()
    assert key not in rules._MEMOS


@pytest.mark.parametrize("name", ["run.vbs.", "run.vbs ", "run.vbs. .", "RUN.JS..", "x\\run.hta "])
def test_trailing_dots_and_spaces_do_not_hide_a_name_that_runs(config: Config, name: str) -> None:
    """Windows saves ``run.vbs.`` as ``run.vbs`` (and ``secure_filename`` strips the dot too):
    libmagic calls the script text/plain, which ``documents`` admits, so only its name tells."""
    policy = rules.effective_policy(config, "default", "agent")
    error = rules.judge_file(policy, facts("text", name))
    assert error is not None and error.code == "type_not_allowed", error
    assert types.extension_of("Invoice.PDF. ") == ".pdf"


@pytest.mark.parametrize("name", ["invoice.pdf.", "invoice.pdf  "])
def test_trailing_dots_and_spaces_do_not_hide_a_spoofed_extension(name: str) -> None:
    error = rules.check_spoofing(facts("pe", name))
    assert error is not None and error.code == "type_mismatch"
    assert error.fields["fileExtension"] == "pdf"


def test_a_type_mismatch_carries_the_allowed_list(config: Config) -> None:
    """SPEC §5: a 415 carries the sniffed type and the allowed list, spoofing included."""
    policy = rules.effective_policy(config, "default", "customer")
    error = rules.judge_file(policy, facts("pe", "invoice.pdf", "application/pdf"))
    assert error is not None and error.code == "type_mismatch"
    assert error.fields["sniffed_type"] == files.EXPECTED["pe"]
    assert error.fields["allowed_types"] == ["image/png", "image/jpeg", ".pdf"]
    assert (error.fields["channel"], error.fields["role"]) == ("default", "customer")

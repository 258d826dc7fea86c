"""The YAML loader and ``check-config``: every rule of SPEC §2/§4 with the line it reports."""

from __future__ import annotations

import dataclasses
import datetime
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.config import (
    Config,
    ConfigError,
    ConfigIssue,
    HostPort,
    RolePolicy,
    SecretValue,
    load_config,
    load_config_text,
)
from tests.support.procs import REPO, child_env, gateway_command

MiB = 1048576
SECRET = "s3cr3t-signing-key-that-must-never-show-up"
ENV = {"GATEWAY_SIGNING_KEY": SECRET}

BASE = textwrap.dedent("""\
    listen: 0.0.0.0:8080
    admin_listen: 127.0.0.1:9102
    backend: {url: "http://127.0.0.1:8081", connect_timeout: 5s, read_timeout: 60s}
    redis: {url: "redis://127.0.0.1:6379/0", key_prefix: upload-gateway}
    auth:
      header: Authorization
      algorithms: [HS256]
      keys: {default: {secret_env: GATEWAY_SIGNING_KEY}}
      leeway: 30s
    spool: {dir: /tmp/ugw-spool, memory_threshold: 1MiB, memory_budget: 24MiB, max_bytes: 2GiB}
    mode: enforce
    cors: {allowed_origins: ["https://chat.example.com"]}
    limits:
      max_file_size: 20MB
      max_request_size: 50MB
      max_files: 10
    uploads:
      routes:
        - path: /streams/{channel}/objects
        - path: /streams/{channel}/objects/{object}/child
        - path: /whatsapp/uploadmedia/{channel}
          methods: [POST, PUT]
      role:
        from_claim: role
        from_form: {field: data, json_key: IsManager, agent_when: true}
        default: customer
      sniff_bytes: 8KiB
    channels:
      default:
        agents:    {enabled: true, max_file_size: 20MB, allowed_types: [images, documents]}
        customers: {enabled: true, max_file_size: 10MB, allowed_types: [image/png, .pdf]}
      whatsapp:
        agents:    {enabled: true, max_file_size: 16MB, allowed_types: ["image/*", audio/ogg]}
        customers: {enabled: false}
    """)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``: keeps expectations readable."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def mutate(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def issues_of(text: str, env: dict[str, str] | None = None, **kwargs: bool) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "policies.yaml", ENV if env is None else env, **kwargs)
    return caught.value.errors


def write_public_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(pem)
    return str(path)


# -- a valid file --------------------------------------------------------------------------------


def test_base_config_loads_into_the_model() -> None:
    config = load_config_text(BASE, env=ENV)
    assert config.listen == HostPort("0.0.0.0", 8080)
    assert config.backend.read_timeout == 60.0
    assert config.auth.keys["default"].secret == SecretValue(SECRET.encode())
    assert config.limits.max_file_size == 20 * MiB
    assert config.limits.max_passthrough_size == 50 * MiB  # the default, like max_request_size
    assert [r.path for r in config.uploads.routes][2] == "/whatsapp/uploadmedia/{channel}"
    assert all(r.methods == ("POST", "PUT") for r in config.uploads.routes)
    assert config.uploads.role.from_form is not None
    assert config.uploads.role.from_form.agent_when is True
    assert config.uploads.sniff_bytes == 8192
    assert (config.spool.memory_threshold, config.spool.memory_budget) == (1 * MiB, 24 * MiB)
    whatsapp = config.channels["whatsapp"]
    assert whatsapp.agents == RolePolicy(True, 16 * MiB, ("image/*", "audio/ogg"))
    assert whatsapp.customers.enabled is False
    assert config.channel("12345") == ("default", config.channels["default"])


def test_max_passthrough_size_zero_means_no_limit() -> None:
    text = BASE.replace("max_files: 10", "max_files: 10\n  max_passthrough_size: 0")
    assert load_config_text(text, env=ENV).limits.max_passthrough_size == 0


def test_shipped_policies_yaml_is_valid_and_matches_spec() -> None:
    config = load_config(str(REPO / "config" / "policies.yaml"), env=ENV)
    assert config.source == str(REPO / "config" / "policies.yaml")
    assert str(config.listen) == "0.0.0.0:8080" and str(config.admin_listen) == "127.0.0.1:9102"
    assert config.spool.dir == "var/spool"
    assert (config.spool.memory_threshold, config.spool.memory_budget) == (2 * MiB, 32 * MiB)
    assert set(config.channels) == {"default", "whatsapp"}
    assert config.channels["default"].agents.allowed_types == (
        "images",
        "documents",
        "application/zip",
    )
    assert config.channels["whatsapp"].customers.enabled is False


def _ca_bundle(path: Path) -> Path:
    """A self-signed CA certificate in PEM: what ``backend.ca_file`` must load."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Backend CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_the_settings_the_sample_file_shows_commented_out_are_real_and_their_defaults(
    tmp_path: Path,
) -> None:
    """The sample file is an operator's reference: each commented-out setting must be a key
    the loader knows, and where it shows a default, the default the code has."""
    path = REPO / "config" / "policies.yaml"
    setting = re.compile(r"^(\s*)# (\s*[a-z_]+:(?: |$))", re.MULTILINE)
    shown = setting.sub(r"\1\2", path.read_text())
    bundle = _ca_bundle(tmp_path / "backend-ca.pem")  # the loader reads the CA file it names
    shown = shown.replace("/etc/ssl/backend-ca.pem", str(bundle))
    # sentinels and cluster are alternatives; the example shows sentinels.
    shown = "\n".join(line for line in shown.splitlines() if not line.startswith("  cluster:"))
    assert len(setting.findall(path.read_text())) >= 15
    sample = load_config(str(path), env=ENV)
    spelled_out = load_config_text(shown, env=ENV)
    examples = {"tls_cert_file": None, "tls_key_file": None}
    assert dataclasses.replace(spelled_out.server, **examples) == sample.server
    assert spelled_out.log_level == sample.log_level
    assert spelled_out.backend == dataclasses.replace(sample.backend, ca_file=str(bundle))
    assert spelled_out.redis.pool_size == sample.redis.pool_size
    assert spelled_out.redis.sentinels and spelled_out.redis.sentinel_service == "mymaster"
    assert spelled_out.auth.retry_after == sample.auth.retry_after
    assert spelled_out.cors == sample.cors


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("20MB", 20 * MiB),
        ("20MiB", 20 * MiB),
        ("20 mb", 20 * MiB),
        ("20971520", 20 * MiB),
        ("1048577", MiB + 1),
        ("512KiB", 512 * 1024),
        ("512KB", 512 * 1024),
    ],
)
def test_sizes_mb_and_mib_are_both_binary(written: str, expected: int) -> None:
    text = mutate("max_request_size: 50MB", f"max_request_size: {written}")
    assert load_config_text(text, env=ENV).limits.max_request_size == expected


def test_omitted_role_settings_inherit_or_deny() -> None:
    text = mutate("    customers: {enabled: false}\n", "")  # whatsapp leaves customers out
    text = mutate(
        "{enabled: true, max_file_size: 16MB, allowed_types", "{enabled: true, allowed_types", text
    )
    text = mutate("max_file_size: 20MB\n", "max_file_size: 18MB\n", text)
    text = mutate("max_file_size: 20MB, allowed_types", "allowed_types", text)
    text += "  report_only: {mode: report, agents: {enabled: true}, enabled: true}\n"
    text += "  closed: {enabled: false}\n"
    config = load_config_text(text, env=ENV)
    whatsapp = config.channels["whatsapp"]
    assert whatsapp.agents.max_file_size == 18 * MiB  # limits.max_file_size
    assert whatsapp.customers == config.channels["default"].customers  # inherited
    assert config.channels["report_only"].agents.allowed_types == ()  # nothing allowed
    assert config.channels["report_only"].mode == "report"
    assert config.channels["closed"].agents.enabled is False
    assert config.channels["closed"].customers.enabled is False


def test_numeric_channel_keys_and_merge_keys() -> None:
    text = BASE + (
        "  12345: &base\n"
        "    agents: {max_file_size: 1MB, allowed_types: [.pdf]}\n"
        "  67890:\n"
        "    <<: *base\n"
        "    mode: report\n"
    )
    config = load_config_text(text, env=ENV)
    assert config.channels["12345"].agents.max_file_size == MiB
    assert config.channels["67890"].agents.allowed_types == (".pdf",)
    assert config.channels["67890"].mode == "report"


def test_config_is_frozen() -> None:
    config = load_config_text(BASE, env=ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_file_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.channels["new"] = config.channels["default"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.auth.keys["evil"] = config.auth.keys["default"]  # type: ignore[index]


def test_secret_never_in_repr() -> None:
    config = load_config_text(BASE, env=ENV)
    assert SECRET not in repr(config) and SECRET not in str(config.auth)
    assert config.auth.keys["default"].secret is not None
    assert config.auth.keys["default"].secret.reveal() == SECRET.encode()


# -- every rule, with its line -------------------------------------------------------------------

ERROR_CASES = [
    # (old, new, expected key, text on the expected line, words in the message)
    ("mode: enforce\n", "mode: enforce\nlistne: 1\n", "listne", "listne", "unknown key"),
    (
        "allowed_types: [image/png, .pdf]",
        "allowed_types: [.pdf], max_filesize: 1MB",
        "channels.default.customers.max_filesize",
        "customers:",
        "unknown key",
    ),
    ("max_files: 10", "max_files: ten", "limits.max_files", "max_files", "integer"),
    ("max_files: 10", "max_files: [1]", "limits.max_files", "max_files", "not a list"),
    (
        "max_files: 10",
        "max_files: 10\n  max_passthrough_size: lots",
        "limits.max_passthrough_size",
        "max_passthrough_size",
        "size",
    ),
    ("listen: 0.0.0.0:8080", "listen: 0.0.0.0", "listen", "listen:", "host:port"),
    (
        "admin_listen: 127.0.0.1:9102",
        "admin_listen: 127.0.0.1:99999",
        "admin_listen",
        "admin_listen",
        "host:port",
    ),
    (
        'url: "http://127.0.0.1:8081"',
        'url: "ftp://127.0.0.1:8081"',
        "backend.url",
        "backend:",
        "http://",
    ),
    ("mode: enforce", "mode: block", "mode", "mode:", "enforce, report"),
    (
        "algorithms: [HS256]",
        "algorithms: [HS256, none]",
        "auth.algorithms[1]",
        "algorithms",
        "never allowed",
    ),
    ("algorithms: [HS256]", "algorithms: []", "auth.algorithms", "algorithms", "at least one"),
    (
        "algorithms: [HS256]",
        "algorithms: [HS256, EdDSA]",
        "auth.algorithms[1]",
        "algorithms",
        "not supported",
    ),
    (
        "{default: {secret_env: GATEWAY_SIGNING_KEY}}",
        "{default: {secret_env: GATEWAY_SIGNING_KEY, public_key_file: /x.pem}}",
        "auth.keys.default",
        "keys:",
        "exactly one",
    ),
    (
        "{default: {secret_env: GATEWAY_SIGNING_KEY}}",
        "{other: {secret_env: NOT_SET_ANYWHERE}}",
        "auth.keys.other.secret_env",
        "keys:",
        "NOT_SET_ANYWHERE is not set",
    ),
    (
        "max_file_size: 16MB",
        "max_file_size: 25MB",
        "channels.whatsapp.agents.max_file_size",
        "max_file_size: 25MB",
        "above limits.max_file_size (20MB)",
    ),
    (
        "max_file_size: 20MB\n",
        "max_file_size: 21MB\n",
        "limits.max_file_size",
        "max_file_size: 21MB",
        "system cap of 20MB",
    ),
    (
        "max_file_size: 20MB\n",
        "max_file_size: 20971521\n",
        "limits.max_file_size",
        "max_file_size: 20971521",
        "system cap",
    ),
    ("  default:\n", "  defualt:\n", "channels.default", "channels:", "required"),
    (
        '"image/*", audio/ogg',
        '"image/*", executable',
        "channels.whatsapp.agents.allowed_types[1]",
        "executable",
        "not a MIME type",
    ),
    (
        '"image/*", audio/ogg',
        '"image/*", pdf',
        "channels.whatsapp.agents.allowed_types[1]",
        '"image/*", pdf',
        "not a MIME type",
    ),
    (
        "- path: /whatsapp/uploadmedia/{channel}",
        "- path: /whatsapp/uploadmedia/{stream}",
        "uploads.routes[2].path",
        "uploadmedia",
        "{channel}",
    ),
    (
        "- path: /streams/{channel}/objects\n",
        "- path: streams/{channel}/objects\n",
        "uploads.routes[0].path",
        "streams/{channel}/objects",
        "start with /",
    ),
    (
        "methods: [POST, PUT]",
        "methods: [POST, GET]",
        "uploads.routes[2].methods[1]",
        "methods:",
        "POST, PUT, PATCH",
    ),
    ("default: customer", "default: admin", "uploads.role.default", "default: admin", "agent"),
    (
        "sniff_bytes: 8KiB",
        "sniff_bytes: 100",
        "uploads.sniff_bytes",
        "sniff_bytes",
        "between 512 bytes and 64KiB",
    ),
    ("sniff_bytes: 8KiB", "sniff_bytes: 65KiB", "uploads.sniff_bytes", "sniff_bytes", "between"),
    (
        "max_files: 10",
        "max_files: 10\n  max_files: 11",
        "limits.max_files",
        "max_files: 11",
        "duplicate key",
    ),
    (
        "connect_timeout: 5s",
        "connect_timeout: soon",
        "backend.connect_timeout",
        "backend:",
        "duration",
    ),
    (
        "customers: {enabled: false}",
        "customers: {enabled: maybe}",
        "channels.whatsapp.customers.enabled",
        "enabled: maybe",
        "true or false",
    ),
    ("header: Authorization", "header: Author ization", "auth.header", "header:", "header name"),
    (
        'allowed_origins: ["https://chat.example.com"]',
        'allowed_origins: ["chat.example.com/"]',
        "cors.allowed_origins[0]",
        "allowed_origins",
        "https://host",
    ),
    (
        "redis: {url: ",
        "redis: {cluster: true, sentinels: [a:1], url: ",
        "redis",
        "redis:",
        "not both",
    ),
    ("mode: enforce\n", "mode: enforce\nlog_level: loud\n", "log_level", "log_level", "INFO"),
    # YAML's .nan/.inf are floats: a NaN leeway makes every `exp` check false (expired Secrets
    # verify), a NaN max_age crashed the loader with a traceback instead of an error line.
    ("leeway: 30s", "leeway: .nan", "auth.leeway", "leeway: .nan", "finite"),
    ("leeway: 30s", "leeway: " + "9" * 400 + "s", "auth.leeway", "leeway:", "finite"),
    (
        "connect_timeout: 5s",
        "connect_timeout: .inf",
        "backend.connect_timeout",
        "backend:",
        "finite",
    ),
    (
        'cors: {allowed_origins: ["https://chat.example.com"]}',
        'cors: {allowed_origins: ["https://chat.example.com"], max_age: .nan}',
        "cors.max_age",
        "cors:",
        "finite",
    ),
    (
        "max_file_size: 16MB",
        "max_file_size: " + "9" * 400 + "MB",
        "channels.whatsapp.agents.max_file_size",
        "max_file_size: 999",
        "above limits.max_file_size",
    ),
    # Templates the segment-wise matcher could never match: uploads there went uninspected.
    (
        "- path: /whatsapp/uploadmedia/{channel}",
        "- path: /whatsapp/uploadmedia/x{channel}",
        "uploads.routes[2].path",
        "uploadmedia",
        "whole path segment",
    ),
    (
        "- path: /whatsapp/uploadmedia/{channel}",
        "- path: /whatsapp/uploadmedia/{channel}?v=2",
        "uploads.routes[2].path",
        "uploadmedia",
        "without a query",
    ),
    (
        "- path: /whatsapp/uploadmedia/{channel}",
        "- path: /whatsapp/../uploadmedia/{channel}",
        "uploads.routes[2].path",
        "uploadmedia",
        "'..' segments",
    ),
    (
        "- path: /whatsapp/uploadmedia/{channel}",
        "- path: /Streams/{channel}/objects/",
        "uploads.routes[2].path",
        "/Streams/",
        "same requests as uploads.routes[0]",
    ),
    (
        "  whatsapp:\n",
        '  "a%2Fb":\n    agents: {allowed_types: [images]}\n  a/b:\n'
        "    agents: {allowed_types: [video]}\n  whatsapp:\n",
        "channels.a/b",
        "  a/b:",
        "same stream id as channels.a%2Fb",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "key", "line_text", "words"),
    ERROR_CASES,
    ids=[case[2] + ":" + case[4] for case in ERROR_CASES],
)
def test_each_rule_reports_key_and_line(
    old: str, new: str, key: str, line_text: str, words: str
) -> None:
    text = mutate(old, new)
    issues = issues_of(text)
    assert [(i.key, i.line) for i in issues] == [(key, line_of(text, line_text))], issues
    assert words in issues[0].message


def test_yaml_syntax_error_has_its_line() -> None:
    text = mutate("max_files: 10", "max_files: [10")
    (issue,) = issues_of(text)
    assert issue.line is not None and issue.line >= line_of(text, "max_files")
    assert "invalid YAML" in issue.message


def test_merge_keys_cannot_multiply_a_small_file_into_millions_of_keys() -> None:
    """ "Billion laughs" through merge keys: each level merges the one below twice. PyYAML
    before 6.0.4 (pyproject's floor was 6.0) copied every merged key each time it was named:
    these 474 bytes became 65,553 keys (and 648 bytes at 22 levels 2.9 GB and 19 s, in every
    worker on a hot reload); 6.0.4 merges each key once (yaml/pyyaml#937)."""
    lines = ["x0: &a0 {k0: v}"]
    lines += [f"x{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}" for i in range(1, 17)]
    text = "\n".join([*lines, "<<: *a16", "channels: {default: {}}"])
    issues = issues_of(text, env=ENV)
    assert len(issues) < 100  # the 17 unknown x keys and k0, once each
    assert all("unknown key" in i.message for i in issues)


DEEP_YAML = {
    "nested_lists": "channels: {default: {}}\nx: " + "[" * 2000 + "]" * 2000 + "\n",
    "merge_chain": "\n".join(
        ["a0: &a0 {k: v}"]
        + [f"a{i}: &a{i} {{<<: *a{i - 1}}}" for i in range(1, 1500)]
        + ["<<: *a1499", "channels: {default: {}}"]
    ),
    "python_tag": 'mode: !!python/name:os.system ""\nchannels: {default: {}}\n',
}


@pytest.mark.parametrize("case", sorted(DEEP_YAML))
def test_yaml_the_loader_cannot_read_is_an_error_not_a_traceback(tmp_path: Path, case: str) -> None:
    """Python's recursion limit (nesting, ``<<`` chains) and a tag the safe loader refuses were
    tracebacks from ``check-config`` and ``serve``, not the file's errors."""
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP_YAML[case])
    result = run_cli("check-config", str(path))
    assert result.returncode == 1, result.stderr[-500:]
    assert "Traceback" not in result.stderr, result.stderr[-500:]
    assert f"{path}" in result.stderr and "invalid YAML" in result.stderr


def test_empty_file_needs_channels() -> None:
    issues = issues_of("", env=ENV)
    assert [i.key for i in issues] == ["channels"]


def test_several_errors_are_reported_together_in_file_order_format() -> None:
    text = mutate("max_files: 10", "max_files: 0")
    text = mutate("max_file_size: 16MB", "max_file_size: 30MB", text)
    text = mutate("mode: enforce\n", "mode: enforce\nbogus: true\n", text)
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "policies.yaml", ENV)
    keys = {i.key for i in caught.value.errors}
    assert keys == {"limits.max_files", "channels.whatsapp.agents.max_file_size", "bogus"}
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert f"policies.yaml:{line_of(text, 'bogus')}: bogus: unknown key" in lines[0]
    assert all(line.startswith("policies.yaml:") for line in lines)
    numbers = [issue.line or 0 for issue in caught.value.errors]
    assert numbers == sorted(numbers)  # file order, whatever order the sections are read in


# -- keys and secrets ----------------------------------------------------------------------------


def test_missing_secret_is_an_error_only_when_serving() -> None:
    (issue,) = issues_of(BASE, env={})
    assert issue.key == "auth.keys.default.secret_env"
    assert issue.line == line_of(BASE, "keys:")
    config = load_config_text(BASE, env={}, require_secrets=False)
    assert config.auth.keys["default"].secret is None
    assert config.auth.keys["default"].secret_env == "GATEWAY_SIGNING_KEY"


def test_public_key_must_fit_the_algorithms(tmp_path: Path) -> None:
    rsa_file = write_public_key(tmp_path / "rsa.pem", rsa.generate_private_key(65537, 2048))
    ec_file = write_public_key(tmp_path / "ec.pem", ec.generate_private_key(ec.SECP256R1()))
    keys = "{default: {secret_env: GATEWAY_SIGNING_KEY}}"
    text = mutate(keys, f"{{rsa: {{public_key_file: {rsa_file}}}}}")
    (issue,) = issues_of(text, env={})  # only HS256 configured
    assert issue.key == "auth.keys.rsa.public_key_file" and "RSA" in issue.message
    text = mutate("algorithms: [HS256]", "algorithms: [RS256]", text)
    config = load_config_text(text, env={})
    assert config.auth.keys["rsa"].public_key_pem == Path(rsa_file).read_bytes()
    ec_text = mutate(keys, f"{{ec: {{public_key_file: {ec_file}}}}}")
    ec_text = mutate("algorithms: [HS256]", "algorithms: [RS256, ES384]", ec_text)
    (issue,) = issues_of(ec_text, env={})  # a P-256 key needs ES256
    assert issue.key == "auth.keys.ec.public_key_file" and "secp256r1" in issue.message
    ec_text = mutate("[RS256, ES384]", "[ES256]", ec_text)
    assert load_config_text(ec_text, env={}).auth.algorithms == ("ES256",)


def test_a_backend_ca_file_that_does_not_load_is_an_error_with_its_line(tmp_path: Path) -> None:
    """It was read only when the backend's pool was made: a wrong path passed check-config and
    crashed the worker at start, or (after a reload) every request to the backend."""
    (tmp_path / "junk.pem").write_text("not a certificate")
    good = _ca_bundle(tmp_path / "ca.pem")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        text = mutate('url: "http://127.0.0.1:8081"', f'url: "https://b.example", ca_file: {path}')
        (issue,) = issues_of(text)
        assert issue.key == "backend.ca_file" and "CA bundle" in issue.message
        assert issue.line is not None
    text = mutate('url: "http://127.0.0.1:8081"', f'url: "https://b.example", ca_file: {good}')
    assert load_config_text(text, env=ENV).backend.ca_file == str(good)


def test_unreadable_public_key_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        text = mutate(
            "{default: {secret_env: GATEWAY_SIGNING_KEY}}", f"{{k: {{public_key_file: {path}}}}}"
        )
        text = mutate("[HS256]", "[RS256]", text)
        (issue,) = issues_of(text, env={}, require_secrets=False)
        assert issue.key == "auth.keys.k.public_key_file" and "PEM" in issue.message


# -- environment overrides -----------------------------------------------------------------------


def test_env_overrides_apply() -> None:
    env = {
        **ENV,
        "GATEWAY_LISTEN": "127.0.0.1:18080",
        "GATEWAY_ADMIN_LISTEN": "[::1]:19102",
        "GATEWAY_REDIS_URL": "redis://10.0.0.5:6380/2",
        "GATEWAY_BACKEND_URL": "https://backend.internal",
    }
    config = load_config_text(BASE, env=env)
    assert config.listen == HostPort("127.0.0.1", 18080)
    assert config.admin_listen == HostPort("::1", 19102)
    assert config.redis.url == "redis://10.0.0.5:6380/2"
    assert config.backend.url == "https://backend.internal"
    assert config.backend.read_timeout == 60.0  # the rest of the section is kept


@pytest.mark.parametrize(
    ("admin", "env"),
    [
        ("127.0.0.1:8080", {}),  # inside listen's 0.0.0.0
        ("0.0.0.0:8080", {}),
        ("127.0.0.1:9102", {"GATEWAY_LISTEN": "127.0.0.1:9102"}),  # made so by a variable
        ('"[::1]:9102"', {"GATEWAY_LISTEN": "[::]:9102"}),
        ('"[0::1]:9102"', {"GATEWAY_LISTEN": "[::1]:9102"}),  # one address, spelt apart
        ('"[::]:9102"', {"GATEWAY_LISTEN": "localhost:9102"}),  # a name is not resolved
    ],
)
def test_admin_listen_on_the_proxy_port_is_an_error(admin: str, env: dict[str, str]) -> None:
    """Both listeners bind with SO_REUSEPORT, so the same port was shared between them: half
    the clients got the admin app (``/metrics`` on the public port), half the scrapes a 401."""
    text = mutate("admin_listen: 127.0.0.1:9102", f"admin_listen: {admin}")
    (issue,) = issues_of(text, env={**ENV, **env})
    assert issue.key == "admin_listen" and "listen" in issue.message
    other_port = mutate("admin_listen: 127.0.0.1:9102", "admin_listen: 127.0.0.1:8081")
    assert load_config_text(other_port, env=ENV).admin_listen.port == 8081
    assert load_config_text(BASE, env={**ENV, "GATEWAY_ADMIN_LISTEN": "10.0.0.1:9102"})


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("0.0.0.0:8080", "[::1]:8080"),
        ("0.0.0.0:8080", "[::]:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
    ],
)
def test_listeners_of_different_families_share_a_port_number(listen: str, admin: str) -> None:
    """asyncio binds IPv6 listeners ``IPV6_V6ONLY``: an IPv4 wildcard never takes an IPv6
    connection, so these pairs are apart (the check refused them)."""
    env = {**ENV, "GATEWAY_LISTEN": listen, "GATEWAY_ADMIN_LISTEN": admin}
    config = load_config_text(BASE, env=env)
    assert config.listen.port == config.admin_listen.port == 8080


def shipped_placeholder() -> str:
    """The signing key deploy/kubernetes/secret.yaml ships, to be replaced before deploying."""
    manifest = yaml.safe_load((REPO / "deploy/kubernetes/secret.yaml").read_text())
    return str(manifest["stringData"]["signing-key"])


def test_the_shipped_placeholder_signing_key_is_refused() -> None:
    """Anyone who read the manifest could sign Secrets with it: not a key to run on."""
    placeholder = shipped_placeholder()
    (issue,) = issues_of(BASE, env={"GATEWAY_SIGNING_KEY": placeholder})
    assert issue.key == "GATEWAY_SIGNING_KEY" and "placeholder" in issue.message
    rotated = mutate(
        "{default: {secret_env: GATEWAY_SIGNING_KEY}}",
        "{default: {secret_env: GATEWAY_SIGNING_KEY}, old: {secret_env: OLD_SIGNING_KEY}}",
    )
    (issue,) = issues_of(rotated, env={**ENV, "OLD_SIGNING_KEY": f" {placeholder.lower()}\n"})
    assert issue.key == "auth.keys.old.secret_env" and "OLD_SIGNING_KEY" in issue.message
    assert issue.line == line_of(rotated, "keys:")
    assert load_config_text(rotated, env={**ENV, "OLD_SIGNING_KEY": "a-real-old-key"})


def test_bad_env_overrides_name_the_variable() -> None:
    env = {
        **ENV,
        "GATEWAY_LISTEN": "nowhere",
        "GATEWAY_REDIS_URL": "http://x",
        "GATEWAY_BACKEND_URL": "ftp://x",
    }
    issues = issues_of(BASE, env=env)
    assert {(i.key, i.line) for i in issues} == {
        ("GATEWAY_LISTEN", None),
        ("GATEWAY_REDIS_URL", None),
        ("GATEWAY_BACKEND_URL", None),
    }


def test_a_malformed_url_is_refused_without_showing_its_password() -> None:
    """A typo in a URL with credentials must not print them (check-config output, logs)."""
    env = {**ENV, "GATEWAY_REDIS_URL": "redis://gateway:s3cret-pw@redis:63x79/0"}
    (issue,) = issues_of(BASE, env=env)
    assert issue.key == "GATEWAY_REDIS_URL" and "s3cret-pw" not in issue.message
    bad = mutate('url: "http://127.0.0.1:8081"', 'url: "http://user:s3cret-pw@[bad"')
    (issue,) = issues_of(bad)
    assert issue.key == "backend.url" and "s3cret-pw" not in issue.message


def test_signing_key_env_overrides_or_creates_default() -> None:
    other = mutate(
        "{default: {secret_env: GATEWAY_SIGNING_KEY}}",
        "{default: {secret_env: UNSET_VAR}, old: {secret_env: OLD_KEY}}",
    )
    config = load_config_text(other, env={"GATEWAY_SIGNING_KEY": "new", "OLD_KEY": "old"})
    assert config.auth.keys["default"].secret == SecretValue(b"new")  # UNSET_VAR not needed
    assert config.auth.keys["old"].secret == SecretValue(b"old")
    no_auth = mutate("  keys: {default: {secret_env: GATEWAY_SIGNING_KEY}}\n", "")
    created = load_config_text(no_auth, env={"GATEWAY_SIGNING_KEY": "k"}).auth.keys["default"]
    assert created.secret == SecretValue(b"k")
    (issue,) = issues_of(no_auth, env={})
    assert issue.key == "auth.keys" and "GATEWAY_SIGNING_KEY" in issue.message
    rs_only = mutate("[HS256]", "[RS256]", no_auth)
    (issue,) = issues_of(rs_only, env={"GATEWAY_SIGNING_KEY": "k"})
    assert issue.key == "GATEWAY_SIGNING_KEY" and issue.line is None


def test_load_config_reads_files_and_reports_missing(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    assert isinstance(load_config(str(path), env=ENV), Config)
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "absent.yaml"), env=ENV)
    assert str(caught.value).startswith(f"{tmp_path / 'absent.yaml'}: cannot read")


# -- check-config, as a real process -------------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*args),
        cwd=REPO,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    ok = run_cli("check-config", str(good), GATEWAY_SIGNING_KEY="")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"OK: {good}\n")
    assert "whatsapp/customer: disabled" in ok.stdout and "/whatsapp/uploadmedia/" in ok.stdout
    bad = tmp_path / "bad.yaml"
    text = mutate("max_file_size: 16MB", "max_file_size: 30MB", mutate("max_files: 10", "x: 1"))
    bad.write_text(text)
    failed = run_cli("--config", str(bad), "check-config")  # global --config, no FILE
    assert failed.returncode == 1
    assert f"{bad}:{line_of(text, 'x: 1')}: limits.x: unknown key" in failed.stderr
    assert f"{bad}:{line_of(text, '30MB')}: channels.whatsapp.agents.max_file_size" in failed.stderr
    assert "OK" not in failed.stdout


def test_check_config_shows_no_backend_password(tmp_path: Path) -> None:
    """The summary ends up in CI logs: a backend URL's password is masked there, as Redis's is
    (aiohttp sends a URL's user and password as Basic auth, so a URL may well carry one)."""
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    ok = run_cli(
        "check-config",
        str(good),
        GATEWAY_BACKEND_URL="https://gateway:s3cret-pw@backend.internal",
        GATEWAY_REDIS_URL="redis://:other-pw@redis:6379/0",
    )
    assert ok.returncode == 0, ok.stderr
    assert "s3cret-pw" not in ok.stdout and "other-pw" not in ok.stdout
    assert "backend https://gateway:***@backend.internal" in ok.stdout

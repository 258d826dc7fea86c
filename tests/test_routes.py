"""Which requests are uploads, and which channel they belong to (SPEC §4 ``uploads.routes``)."""

from __future__ import annotations

import pytest

from gateway.config.loader import load_config_text
from gateway.config.model import Config
from gateway.policy.routes import UploadTarget, channel_key, match_upload
from tests.support.files import policy_yaml


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config_text(policy_yaml("/tmp/gw-spool"), require_secrets=False)


@pytest.mark.parametrize(
    ("method", "path", "route", "channel_id", "channel"),
    [
        ("POST", "/streams/123/objects", "/streams/{channel}/objects", "123", "default"),
        ("PUT", "/streams/whatsapp/objects", "/streams/{channel}/objects", "whatsapp", "whatsapp"),
        (
            "POST",
            "/streams/10020/objects/77/child",
            "/streams/{channel}/objects/{object}/child",
            "10020",
            "10020",
        ),
        (
            "POST",
            "/whatsapp/uploadmedia/small",
            "/whatsapp/uploadmedia/{channel}",
            "small",
            "small",
        ),
        # an URL-encoded encrypted stream id: %2F stays inside the one segment
        (
            "POST",
            "/whatsapp/uploadmedia/aB%2Fc%3D%3D",
            "/whatsapp/uploadmedia/{channel}",
            "aB/c==",
            "default",
        ),
    ],
)
def test_platform_routes_are_uploads(
    config: Config, method: str, path: str, route: str, channel_id: str, channel: str
) -> None:
    assert match_upload(config, method, path) == UploadTarget(route, channel_id, channel)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/streams/123/objects"),
        ("DELETE", "/streams/123/objects"),
        ("POST", "/streams/123"),
        ("POST", "/streams/123/objects/extra"),
        ("POST", "/other/123/objects"),
        ("POST", "/files/123/report.pdf"),  # that route takes PUT only
    ],
)
def test_other_requests_are_not_uploads(config: Config, method: str, path: str) -> None:
    assert match_upload(config, method, path) is None


@pytest.mark.parametrize(
    "path",
    [
        "/streams/123/objects/",
        "//streams//123/objects",
        "/STREAMS/123/Objects",
        "/streams/123/x/../objects",
        "/streams/123/./objects",
        "/str%65ams/123/objects",
        "/streams/123/objects?x=1",
    ],
)
def test_path_variants_a_backend_may_accept_are_still_inspected(config: Config, path: str) -> None:
    target = match_upload(config, "post", path)
    assert target is not None and target.channel_id == "123"


def test_channel_keys_match_raw_or_decoded_ids() -> None:
    text = policy_yaml("/tmp/gw-spool").replace(
        "  small:",
        '  "enc%2Fid":\n    agents: {allowed_types: [images]}\n  "a b":\n'
        "    agents: {allowed_types: [images]}\n  small:",
    )
    config = load_config_text(text, require_secrets=False)
    raw = match_upload(config, "POST", "/whatsapp/uploadmedia/enc%2Fid")
    decoded = match_upload(config, "POST", "/whatsapp/uploadmedia/a%20b")
    assert raw is not None and raw.channel == "enc%2Fid" and raw.channel_id == "enc/id"
    assert decoded is not None and decoded.channel == "a b"


def test_a_trailing_placeholder_names_the_file(config: Config) -> None:
    target = match_upload(config, "PUT", "/files/whatsapp/r%C3%A9sum%C3%A9.pdf")
    assert target is not None
    assert (target.channel, target.url_filename) == ("whatsapp", "résumé.pdf")
    child = match_upload(config, "POST", "/streams/1/objects/report.pdf/child")
    assert child is not None and child.url_filename is None


def test_channel_keys_match_however_the_id_is_encoded() -> None:
    """The backend decodes ``AbC%3D%3D``, ``AbC%3d%3d`` and ``AbC==`` to the same stream id, so
    a key written encoded must match all of them, not only the one spelling (SPEC §4)."""
    text = policy_yaml("/tmp/gw-spool").replace(
        "  small:", '  "AbC%3D%3D":\n    customers: {enabled: false}\n  small:'
    )
    config = load_config_text(text, require_secrets=False)
    for stream_id in ("AbC%3D%3D", "AbC%3d%3d", "AbC==", "AbC%3D=", "Ab%43=="):
        target = match_upload(config, "POST", f"/whatsapp/uploadmedia/{stream_id}")
        assert target is not None and target.channel == "AbC%3D%3D", stream_id
    assert channel_key(config, "AbC%3D") == "default"

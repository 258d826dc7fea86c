"""``upload-gateway explain``: sniffed type, the policy with its sources, verdict and exit code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gateway.cli import main
from tests.support import files
from tests.support.procs import child_env, gateway_command


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(files.policy_yaml(str(tmp_path / "spool")))
    return path


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def explain(policies: Path, *args: str) -> int:
    return main(["--config", str(policies), "explain", *args])


def test_accepted_file_shows_type_policy_and_sources(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "invoice.pdf", files.pdf())
    assert explain(policies, "--channel", "whatsapp", "--role", "agent", path) == 0
    out = capsys.readouterr().out
    assert "sniffed type: application/pdf" in out
    assert "16MB (16777216 bytes)" in out and "channels.whatsapp.agents.max_file_size" in out
    assert "limits.max_request_size" in out and "channels.whatsapp.agents.allowed_types" in out
    assert "verdict:      ACCEPTED" in out


def test_executable_renamed_pdf_is_rejected_with_reason(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "invoice.pdf", files.pe())
    assert explain(policies, "--channel", "whatsapp", "--role", "agent", path) == 1
    out = capsys.readouterr().out
    assert "REJECTED: 415 type_mismatch" in out
    assert "named .pdf but its content is application/vnd.microsoft.portable-executable" in out


def test_json_output_and_size_limit(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "photo.png", files.make("png", 501))
    assert explain(policies, "--json", "--channel", "small", "--role", "customer", path) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["verdict"] == "reject"
    assert answer["file"] == {
        "name": "photo.png",
        "size": 501,
        "declared_type": None,
        "sniffed_type": "image/png",
    }
    assert answer["reason"]["code"] == "file_too_large"
    assert answer["reason"]["limit_source"] == "channels.small.customers.max_file_size"
    assert answer["policy"]["max_file_size"]["bytes"] == 500
    path = write(tmp_path, "exact.png", files.make("png", 500))
    assert explain(policies, "--json", "--channel", "small", "--role", "customer", path) == 0


def test_report_mode_passes_but_says_it_would_reject(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "clip.mp4", files.mp4())
    assert explain(policies, "--channel", "tools", "--role", "agent", path) == 0
    out = capsys.readouterr().out
    assert "WOULD BE REJECTED (mode report" in out and "channels.tools.mode" in out
    # customers of 'tools' are the default channel's: the source says so
    assert explain(policies, "--channel", "tools", "--role", "customer", path) == 0
    assert "channels.default.customers.allowed_types" in capsys.readouterr().out


def test_disabled_role_and_declared_type(
    policies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "a.png", files.png())
    assert explain(policies, "--channel", "whatsapp", "--role", "customer", path) == 1
    assert "403 uploads_disabled" in capsys.readouterr().out
    assert (
        explain(policies, "--channel", "12345", "--role", "agent", "--type", "video/mp4", path) == 1
    )
    out = capsys.readouterr().out
    assert "channel:      default" in out and "declared as video/mp4" in out


def test_missing_file_is_exit_2(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert explain(policies, "--channel", "x", "--role", "agent", "/nonexistent/file") == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_installed_command(policies: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", files.text())
    result = subprocess.run(
        gateway_command(
            "explain",
            "--config",
            str(policies),
            "--channel",
            "default",
            "--role",
            "agent",
            "--json",
            path,
        ),
        capture_output=True,
        env=child_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file"]["sniffed_type"] == "text/plain"

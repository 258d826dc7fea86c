"""The ``upload-gateway`` command line as a whole (``gateway/cli.py``)."""

from __future__ import annotations

import subprocess

from tests.support.procs import REPO, child_env, gateway_command


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """``upload-gateway keys list | head -1`` or ``check-config ... | head``: the reader went
    away, which is no error of the command's; Python printed a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        gateway_command("check-config", "config/policies.yaml"),
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, what a shell reports for `cmd | head`


def test_serve_refuses_fewer_than_one_worker() -> None:
    """``--workers 0`` ran one worker without a word: not what the operator asked for."""
    for value in ("0", "-2", "two"):
        result = subprocess.run(
            gateway_command("serve", "--workers", value),
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr  # argparse's usage error
        assert "--workers" in result.stderr and "Traceback" not in result.stderr

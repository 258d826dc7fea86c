"""``upload-gateway sample-backend`` as an operator runs it (README, Commands; ``make run``)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from pathlib import Path

from tests.support import files
from tests.support.procs import REPO, child_env, free_port, gateway_command, wait_for_port


def sample_backend(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        gateway_command("sample-backend", *args),
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_it_stores_an_upload_and_records_what_reached_it(tmp_path: Path) -> None:
    port = free_port()
    proc = sample_backend("--listen", f"127.0.0.1:{port}", "--store", str(tmp_path / "store"))
    try:
        wait_for_port(port, timeout=20, proc=None)
        body, ctype = files.multipart([("file", "photo.png", "image/png", files.png())])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/streams/42/objects",
            data=body,
            headers={"Content-Type": ctype},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        (stored,) = answer["data"]["files"]
        assert stored == {"field": "file", "fileName": "photo.png", "size": len(files.png())}
        saved = tmp_path / "store" / answer["data"]["objectId"] / "photo.png"
        assert saved.read_bytes() == files.png()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sample/requests") as response:
            (seen,) = json.loads(response.read())
        assert seen["path"] == "/streams/42/objects" and seen["length"] == len(body)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_port_in_use_is_one_line_and_exit_1_not_a_traceback(tmp_path: Path) -> None:
    """``make run`` shows the end of the backend's log when it did not start: that was the
    bottom of a uvloop traceback."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    try:
        proc = sample_backend("--listen", address, "--store", str(tmp_path / "store"))
        _, stderr = proc.communicate(timeout=30)
    finally:
        holder.close()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"cannot listen on {address}" in stderr and "address already in use" in stderr.lower()


def test_a_listen_that_is_not_host_port_is_a_usage_error(tmp_path: Path) -> None:
    proc = sample_backend("--listen", "8081x", "--store", str(tmp_path / "store"))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and "--listen" in stderr

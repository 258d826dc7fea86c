"""``serve --workers 2`` (issue 5, SPEC §2/§6): both workers serve, /metrics adds them up, and
SIGTERM to the parent stops everything cleanly.

Each request goes on a new connection, so SO_REUSEPORT spreads them over both workers; the
access log's ``pid`` says who served which. Whichever worker answers a scrape, the totals must
be the totals of *all* requests — that is what prometheus_client's multiprocess mode is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc, start_gateway
from tests.support.procs import RedisServer
from tests.test_metrics import (
    OBJECTS,
    Samples,
    bearer,
    mint,
    new_key,
    observed_config,
    promtool_check,
    scrape,
    send,
    upload,
)

PLAIN, UPLOADS = 40, 6


def access_pids(gw: GatewayProc, expected: int, timeout: float = 5.0) -> list[int]:
    """The ``pid`` of every access line, once all ``expected`` lines are written."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in gw.log().splitlines() if x.startswith('{"request_id"')]
        if len(lines) >= expected or time.monotonic() > deadline:
            return [int(line["pid"]) for line in lines]
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has stopped already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def workers(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProc, list[int]]]:
    tmp = tmp_path_factory.mktemp("workers")
    gw = start_gateway(
        observed_config(redis_server, backend_proc, tmp, "ugw-workers"), tmp, workers=2
    )
    pids: list[int] = []
    try:
        agent = bearer(mint(gw, new_key(gw, "workers-client"), "role=agent"))
        for _ in range(PLAIN):
            assert send(gw.port, "GET", "/t/status/200", headers=agent).status == 200
        body, headers = upload("photo.png", "image/png", files.png())
        for i in range(UPLOADS):
            assert (
                send(
                    gw.port, "POST", f"/streams/{500 + i}/objects", body, {**headers, **agent}
                ).status
                == 200
            )
        pids = sorted(set(access_pids(gw, PLAIN + UPLOADS)))
        yield gw, pids
    finally:
        gw.stop()
        for pid in pids:  # only if the parent failed to stop them (the test then fails)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_both_workers_serve_requests(workers: tuple[GatewayProc, list[int]]) -> None:
    gw, pids = workers
    assert len(pids) == 2, pids
    assert gw.proc.pid not in pids  # the parent only supervises


def test_every_scrape_reports_the_totals_of_all_workers(
    workers: tuple[GatewayProc, list[int]],
) -> None:
    gw, _ = workers
    body_size = len(upload("photo.png", "image/png", files.png())[0])
    for _ in range(4):  # new connections: the scrapes land on either worker
        samples = Samples(scrape(gw))
        assert samples.by("requests_total", "route") == {"proxy": PLAIN, OBJECTS: UPLOADS}
        assert (
            samples.get("uploads_total", channel="default", role="agent", outcome="accepted")
            == UPLOADS
        )
        assert samples.get("received_bytes_total", route=OBJECTS) == UPLOADS * body_size
        assert (
            samples.get("upload_file_size_bytes_count", channel="default", role="agent") == UPLOADS
        )
        assert samples.get("request_duration_seconds_count", route="proxy") == PLAIN
        assert samples.get("inflight_uploads") == 0
        assert samples.get("spool_bytes") == 0
        assert samples.get("build_info", version=__import__("gateway").__version__) == 1


def test_the_aggregated_exposition_passes_promtool(workers: tuple[GatewayProc, list[int]]) -> None:
    promtool_check(scrape(workers[0]))


def test_sigterm_to_the_parent_stops_both_workers_and_exits_0(
    workers: tuple[GatewayProc, list[int]],
) -> None:
    gw, pids = workers
    assert all(alive(pid) for pid in pids)
    gw.signal(signal.SIGTERM)
    try:
        code = gw.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the parent did not exit within 15 s of SIGTERM:\n" + gw.log()[-3000:])
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if alive(pid)] == [], "workers outlived their parent"
    assert code == 0


def test_one_worker_ignores_an_inherited_multiprocess_directory(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path: Path
) -> None:
    """An image made for gunicorn may set PROMETHEUS_MULTIPROC_DIR: one worker must still
    count in memory, or its files would pile up in a directory nobody wipes and every restart
    would add the last run's counts (and in-flight gauges) to /metrics."""
    inherited = tmp_path / "inherited-metrics"
    inherited.mkdir()
    config = observed_config(redis_server, backend_proc, tmp_path, "ugw-one-worker")
    gw = start_gateway(config, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(inherited))
    try:
        agent = bearer(mint(gw, new_key(gw, "one-worker-client"), "role=agent"))
        for _ in range(3):
            assert send(gw.port, "GET", "/t/status/200", headers=agent).status == 200
        assert Samples(scrape(gw)).by("requests_total", "route") == {"proxy": 3}
        assert list(inherited.iterdir()) == []
    finally:
        gw.stop()

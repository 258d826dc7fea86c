"""The garbage collector's settings, and that an upload leaves nothing for it to find.

A request whose objects form a reference cycle outlives its response until the collector runs;
with ``gateway/collector.py``'s higher gen-0 threshold that is after ~10,000 more allocations,
so a cycle holding a 256 KiB chunk, once per refusal, would be memory held for nothing. These
run the real app in this process (a real socket, the suite's redis-server and backend) with the
collector off, and look for what is still alive after the answer.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import build_app, build_state
from gateway.collector import GEN0_THRESHOLD, tune_collector
from gateway.config import load_config
from gateway.inspect.multipart import MultipartInspector
from tests.support import files
from tests.support.gateway_proc import SIGNING_KEY, GatewayProc

UPLOAD = "/streams/4711/objects"


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def test_tuning_freezes_the_startup_heap_and_raises_gen0() -> None:
    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_an_upload_leaves_no_cycle_accepted_or_refused(
    gateway: GatewayProc,
    secret: str,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    collector_off: None,
) -> None:
    monkeypatch.setenv("GATEWAY_SIGNING_KEY", SIGNING_KEY)
    client: TestClient = await aiohttp_client(
        build_app(build_state(load_config(str(gateway.config_path))))
    )
    cases = {
        200: [("file", "photo.png", "image/png", files.png())],
        415: [("file", "invoice.pdf", "application/pdf", files.elf())],  # spoofing: raised deep
    }
    for status, parts in cases.items():
        body, ctype = files.multipart(parts)
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": ctype}
        async with client.post(UPLOAD, data=body, headers=headers) as response:
            await response.read()
            assert response.status == status
        assert alive(MultipartInspector) == 0, f"an upload answered {status} left a cycle"

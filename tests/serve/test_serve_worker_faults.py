"""A hung score worker against the real server: ``serve --decoder dedicated --score-workers 1`` (the master
plus one score-worker process), the worker SIGSTOP-ed mid-session.

The hang is noticed by its missing heartbeat within the default ``--heartbeat-timeout`` (5 s) — well inside
10 s and independent of chunk traffic —, ``/readyz`` turns false with a reason naming the rank and saying it
stopped responding (not that it "most likely exited"), the live session fails with that reason, and API
calls never wait on the hung group: a DELETE issued during the hang returns once the hang is noticed, a
create after that is refused at once. Tests run in file order.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import ServeProcess, portrait_base64, worker_pids


@pytest.fixture(scope="module")
def server(dedicated_server: ServeProcess) -> ServeProcess:
    return dedicated_server  # this module's own 1 + 1 group (the fixture is module-scoped)


@pytest.fixture(scope="module")
def http(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _create(http: httpx.Client, name: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = http.post(
        "/v1/sessions", json={"image": portrait_base64(), "output": {"type": "file", "path": name}}
    )
    return response, time.monotonic() - start


def _ready(server: ServeProcess) -> tuple[bool, str]:
    response = httpx.get(f"{server.url}/readyz", timeout=5)
    return response.status_code == 200, response.json()["reason"]


def test_a_stopped_worker_is_noticed_within_10_s_and_nothing_waits_on_it(
    server: ServeProcess, http: httpx.Client
) -> None:
    live, _ = _create(http, "live.mp4")
    closing, _ = _create(http, "closing.mp4")
    assert live.status_code == closing.status_code == 201, live.text
    time.sleep(1.0)  # both generating
    (pid,) = worker_pids(server)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()

    deleted: dict[str, Any] = {}

    def delete() -> None:  # the engine thread is blocked on the hung worker when this arrives
        response = http.delete(f"/v1/sessions/{closing.json()['id']}")
        deleted.update(status=response.status_code, s=time.monotonic() - stopped_at, body=response.json())

    deleter = threading.Thread(target=delete)
    deleter.start()

    ready, reason = _ready(server)
    while ready and time.monotonic() - stopped_at < 15:
        time.sleep(0.1)
        ready, reason = _ready(server)
    noticed_s = time.monotonic() - stopped_at
    print(f"\nnoticed after {noticed_s:.1f} s: {reason}")
    assert not ready and noticed_s < 10
    assert "rank 1" in reason and "stopped responding" in reason and "no heartbeat" in reason
    assert f"pid {pid}) is stopped" in reason and "most likely exited" not in reason

    refused, took = _create(http, "refused.mp4")
    print(f"create during the hang: {refused.status_code} in {took:.2f} s")
    assert refused.status_code == 503 and took < 2
    assert "stopped responding" in refused.json()["detail"]

    deleter.join(10)
    assert not deleter.is_alive()
    print(f"DELETE during the hang: {deleted['status']} after {deleted['s']:.1f} s")
    assert deleted["status"] == 200 and deleted["s"] < noticed_s + 2

    info = http.get(f"/v1/sessions/{live.json()['id']}").json()
    assert info["state"] == "failed" and "stopped responding" in info["reason"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200

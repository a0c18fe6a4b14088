"""Faults of a score worker against the real server, and the group healing itself: ``serve --decoder
dedicated --score-workers 1 --max-worker-restarts 2`` (the master plus one score-worker process).

1. The worker is SIGSTOP-ed mid-session: the hang is noticed by its missing heartbeat within the default
   ``--heartbeat-timeout`` (5 s) — well inside 10 s and independent of chunk traffic —, ``/readyz`` turns
   false with a reason naming the rank and saying it stopped responding (not that it "most likely exited"),
   the live session fails with that reason, and API calls never wait on the hung group: a DELETE issued
   during the hang returns within 2 s (its close stays queued), a create after that is refused at once.
2. The master kills the stopped worker, starts a new one in a new world, warms up and is ready again by
   itself; a new session produces frames.
3. ``kill -9`` of the (new) worker heals the same way.
4. A third fault exceeds the restart budget: the group stays failed and ``/readyz`` says it gave up.

Tests run in file order, on one server.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import ServeProcess, portrait_base64, start_serve, worker_pids

_FAULTS: dict[str, tuple[int, float]] = {}  # fault -> (the worker's pid, when it was hit), for later tests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "out").mkdir()
    group = ("--decoder", "dedicated", "--score-workers", "1", "--max-worker-restarts", "2")
    served = start_serve(tmp, *group, api={"file_output_dir": str(tmp / "out")})
    yield served
    served.stop()


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
    assert "replacing the score workers (restart 1 of 2" in reason

    refused, took = _create(http, "refused.mp4")
    print(f"create during the hang: {refused.status_code} in {took:.2f} s")
    assert refused.status_code == 503 and took < 2
    assert "stopped responding" in refused.json()["detail"]

    deleter.join(10)
    assert not deleter.is_alive()
    print(f"DELETE during the hang: {deleted['status']} after {deleted['s']:.1f} s")
    assert deleted["status"] == 200 and deleted["s"] < 3  # it did not wait for the hang to be noticed

    info = http.get(f"/v1/sessions/{live.json()['id']}").json()
    assert info["state"] == "failed" and "stopped responding" in info["reason"]
    assert "replacing the score workers" in info["reason"]  # the caller knows to come back
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    _FAULTS["stopped"] = (pid, stopped_at)


def _until_ready(server: ServeProcess, since: float, within_s: float = 40) -> float:
    """Seconds from ``since`` until /readyz is true again (fails the test past ``within_s``)."""
    ready, reason = _ready(server)
    while not ready and time.monotonic() - since < within_s:
        time.sleep(0.2)
        ready, reason = _ready(server)
    assert ready, f"not ready again {within_s} s after the fault: {reason}"
    return time.monotonic() - since


def _serves(http: httpx.Client, name: str) -> None:
    """A new session is created and generates chunks."""
    created, _ = _create(http, name)
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 15
    info = created.json()
    while info["chunks_generated"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        info = http.get(f"/v1/sessions/{info['id']}").json()
    assert info["state"] == "running" and info["chunks_generated"] >= 2, info


def test_the_master_replaces_the_stopped_worker_and_serves_again(
    server: ServeProcess, http: httpx.Client
) -> None:
    old_pid, stopped_at = _FAULTS["stopped"]
    healed_s = _until_ready(server, stopped_at)
    print(f"\nready again {healed_s:.1f} s after the SIGSTOP")
    (new_pid,) = worker_pids(server)
    assert new_pid != old_pid and not Path(f"/proc/{old_pid}").exists()  # killed although stopped
    _serves(http, "after-stop.mp4")
    assert "replacing the score workers (restart 1 of 2 within 600 s)" in server.log()


def test_a_killed_worker_is_replaced_too(server: ServeProcess, http: httpx.Client) -> None:
    (pid,) = worker_pids(server)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    deadline = killed_at + 10
    while _ready(server)[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    ready, reason = _ready(server)
    assert not ready and "rank 1" in reason and "died" in reason
    healed_s = _until_ready(server, killed_at)
    print(f"\nready again {healed_s:.1f} s after the SIGKILL")
    _serves(http, "after-kill.mp4")


def test_past_the_restart_budget_the_group_stays_failed_and_says_so(
    server: ServeProcess, http: httpx.Client
) -> None:
    (pid,) = worker_pids(server)
    os.kill(pid, signal.SIGKILL)
    time.sleep(4)  # a restart would have begun by now
    ready, reason = _ready(server)
    print(f"\nafter the third fault: {reason}")
    assert not ready and "rank 1" in reason and "died" in reason
    assert "gave up: the score workers were replaced 2 time(s) within 600 s already" in reason
    assert reason.endswith("restart the server")
    assert worker_pids(server) == []  # no new worker was started
    refused, took = _create(http, "refused-for-good.mp4")
    assert refused.status_code == 503 and took < 2 and "gave up" in refused.json()["detail"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_sigterm_while_the_group_heals_exits_0_and_leaves_no_rank(tmp_path: Path) -> None:
    # The engine thread is inside the new world's rendezvous when SIGTERM comes (its new worker is held
    # stopped, so the rendezvous cannot finish) and cannot be stopped. In a CI run, SIGTERM during a heal
    # once ended in SIGABRT at interpreter finalisation ("terminate called without an active exception");
    # this exact scenario did not reproduce that here, but it is the path: the CLI now ends a process whose
    # engine thread was left behind with os._exit, once the launcher reaped the workers.
    (tmp_path / "out").mkdir()
    served = start_serve(
        tmp_path,
        "--decoder",
        "dedicated",
        "--resolution",
        "32x32",
        api={"file_output_dir": str(tmp_path / "out")},
    )
    try:
        (old,) = worker_pids(served)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        new: list[int] = []
        while time.monotonic() < deadline and not new:
            new = [pid for pid in worker_pids(served) if pid != old]
            time.sleep(0.01)
        assert new, "no replacement worker was started"
        os.kill(new[0], signal.SIGSTOP)  # the new world's rendezvous now waits for it
        time.sleep(1.0)
        assert not _ready(served)[0]
    finally:
        code = served.stop()
    assert code == 0, served.log()[-2000:]
    assert worker_pids(served) == []

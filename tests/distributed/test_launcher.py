"""Launcher: a world runs to completion; a killed rank is named, the world torn down, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proto.topology import Topology
from server.launcher import launch, under_torchrun
from tests.sockets import beyond_loopback

_TESTS = str(Path(__file__).resolve().parent)
_REPO = Path(__file__).resolve().parents[2]


def _pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(pid_dir.glob("rank*.pid"))]


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_a_three_rank_world_exchanges_tensors_and_exits_zero(tmp_path) -> None:
    code = launch(Topology(2, "dedicated"), "launcher_entries:exchange", ["2", "dedicated"],
                  env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)})
    assert code == 0
    assert len(_pids(tmp_path)) == 3


@pytest.mark.slow
def test_a_killed_worker_is_named_within_10_s_and_no_rank_survives(tmp_path, capfd) -> None:
    code = launch(Topology(2, "dedicated"), "launcher_entries:worker_killed",
                  env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)})
    returned_at = time.time()
    stderr = capfd.readouterr().err
    assert code != 0
    assert returned_at - float((tmp_path / "killed_at").read_text()) < 10.0
    assert "rank 2 (score worker 1) failed first: killed by SIGKILL" in stderr
    pids = _pids(tmp_path)
    assert len(pids) == 3
    assert not [pid for pid in pids if _running(pid)]


@pytest.mark.slow
def test_the_master_itself_names_the_rank_it_lost(tmp_path, capfd) -> None:
    launch(Topology(2, "dedicated"), "launcher_entries:worker_killed",
           env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)})
    assert "rank 0: header from rank 2: the collective failed" in capfd.readouterr().err


@pytest.mark.slow
def test_survive_workers_runs_rank_0_here_and_outlives_a_dead_worker(tmp_path, capfd) -> None:
    # serve's mode: the worker's death is said, not acted on; rank 0 notices it itself and carries on, and
    # the workers left are stopped when it returns.
    environ = dict(os.environ)
    code = launch(Topology(2, "dedicated"), "launcher_entries:worker_dies_server_goes_on",
                  env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)}, survive_workers=True)
    assert code == 0
    assert (tmp_path / "noticed").exists()
    pids = _pids(tmp_path)
    assert len(pids) == 3 and pids[0] == os.getpid()  # rank 0 ran in this process
    assert not [pid for pid in pids[1:] if _running(pid)]  # rank 2 died, rank 1 was stopped
    err = capfd.readouterr().err
    assert "rank 2 (score worker 1) exited: killed by SIGKILL; rank 0 goes on without it" in err
    assert "rank 1" not in err and "failed first" not in err
    assert dict(os.environ) == environ  # rank 0's env:// variables do not outlive it


def test_the_world_listens_on_loopback_only(tmp_path) -> None:
    # The store used to listen on every interface (``*:port``) even for ``serve --host 127.0.0.1``: an
    # unauthenticated key-value store of the group's control state, reachable from the network.
    code = launch(Topology(1, "dedicated"), "launcher_entries:listeners",
                  env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)})
    assert code == 0
    listening = [tuple(entry) for entry in json.loads((tmp_path / "listeners.json").read_text())]
    assert listening, "found no listening socket at all (the store must be one)"
    assert beyond_loopback(listening) == []


def test_an_entry_that_is_not_module_colon_function_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'package\.module:function'"):
        launch(Topology(1, "colocated"), "launcher_entries.exchange")


def test_under_torchrun_follows_the_env_variables(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not under_torchrun()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert under_torchrun()


_LAUNCH_SLEEPERS = """
import sys
from proto.topology import Topology
from server.launcher import launch
sys.exit(launch(Topology(1, "dedicated"), "launcher_entries:sleeper"))
"""


@pytest.mark.slow
def test_ranks_die_with_a_launcher_that_is_killed(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_REPO), _TESTS]), TM_TEST_PID_DIR=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCH_SLEEPERS], env=env, cwd=_REPO)
    try:
        deadline = time.monotonic() + 60
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(tmp_path)
        assert len(pids) == 2
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _running(pid)]


@pytest.mark.slow
def test_survive_workers_lets_rank_0_replace_its_workers_in_a_new_world(tmp_path, capfd) -> None:
    # serve's self-healing: a hung (stopped) worker and its peer are killed, new ranks start on a new store
    # port, rank 0 rejoins there, and the new world works; the killed ones are not reported as news.
    environ = dict(os.environ)
    code = launch(Topology(2, "dedicated"), "launcher_entries:workers_replaced",
                  env={"PYTHONPATH": _TESTS, "TM_TEST_PID_DIR": str(tmp_path)}, survive_workers=True)
    assert code == 0
    first, second = (tmp_path / "ports").read_text().split()
    assert first != second
    pids = {(port, r): int((tmp_path / f"port{port}-rank{r}.pid").read_text())
            for port in (first, second) for r in (0, 1, 2)}
    assert pids[first, 0] == pids[second, 0] == os.getpid()  # rank 0 joined both worlds from this process
    assert len({pids[port, r] for port in (first, second) for r in (1, 2)}) == 4  # new worker processes
    assert not [pid for pid in pids.values() if pid != os.getpid() and _running(pid)]
    err = capfd.readouterr().err
    assert "goes on without it" not in err
    assert dict(os.environ) == environ

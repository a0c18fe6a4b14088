"""Liveness: the heartbeat names ranks that stopped beating (``HeartbeatMonitor``, ``RankWatch``: died vs
stopped responding)."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import torch.distributed as dist

from engine.rank_registry import RankWatch
from proto.liveness import Heartbeat, HeartbeatMonitor, stale_ranks


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True,
                         timeout=datetime.timedelta(seconds=10), wait_for_workers=False)


def test_a_rank_that_never_beat_is_stale() -> None:
    store = _store()
    beat = Heartbeat(store, rank=1, interval_s=0.05).start()
    try:
        assert stale_ranks(store, [1, 2], max_age_s=1.0) == [2]
    finally:
        beat.stop()


def test_a_rank_whose_heartbeat_stopped_becomes_stale_after_max_age() -> None:
    store = _store()
    beat = Heartbeat(store, rank=1, interval_s=0.05).start()
    time.sleep(0.2)
    assert stale_ranks(store, [1], max_age_s=0.3) == []
    beat.stop()
    time.sleep(0.5)
    assert stale_ranks(store, [1], max_age_s=0.3) == [1]


def test_the_monitor_measures_silence_by_its_own_clock_from_the_last_new_stamp() -> None:
    store = _store()
    beat = Heartbeat(store, rank=1, interval_s=0.05).start()
    monitor = HeartbeatMonitor(store, [1, 2])
    time.sleep(0.3)
    silent = monitor.silent_s()
    assert silent[1] < 0.2  # beating
    assert silent[2] >= 0.3  # never beat: silent since the monitor was made
    beat.stop()
    time.sleep(0.4)
    assert monitor.silent_s()[1] >= 0.3


def _child(store: dist.Store, rank: int) -> subprocess.Popen[bytes]:
    """A process registered as ``rank`` whose heartbeat is stamped here while the test wants it alive."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.set(f"tm/rank_process/{rank}", f"{socket.gethostname()} {proc.pid}")
    return proc


def test_rank_watch_says_a_stopped_process_stopped_responding_and_a_killed_one_died() -> None:
    store = _store()
    stopped, killed = _child(store, 1), _child(store, 2)
    try:
        beats = {1: Heartbeat(store, rank=1, interval_s=0.05).start(),
                 2: Heartbeat(store, rank=2, interval_s=0.05).start()}
        watch = RankWatch(store, [1, 2], silence_s=0.5, exit_status=lambda r: "killed by SIGKILL")
        time.sleep(0.2)
        assert watch.faults() == []
        os.kill(stopped.pid, signal.SIGSTOP)
        beats[1].stop()  # a stopped process stops beating (its heartbeat thread stops with it)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert [(f.rank, f.hung) for f in watch.faults()] == [(2, False)]  # death is seen at once
        time.sleep(0.7)
        faults = {f.rank: f for f in watch.faults()}
        assert faults[2].detail == "killed by SIGKILL"
        assert faults[1].hung and "no heartbeat for" in faults[1].detail
        assert f"pid {stopped.pid}) is stopped" in faults[1].detail
        beats[2].stop()
    finally:
        stopped.kill()
        stopped.wait()

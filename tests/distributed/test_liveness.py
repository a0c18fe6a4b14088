"""Liveness: the heartbeat names ranks that stopped beating; bounded waits raise PeerError."""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from proto.liveness import Heartbeat, stale_ranks


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

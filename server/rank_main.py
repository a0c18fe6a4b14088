"""One rank's life in a serving group, shared by ``run``, ``serve`` and the TTBC study.

Every rank joins the world, registers its process (``engine.rank_registry``) and starts a heartbeat so the
master can name a rank that dies; a score rank builds its share of the DiT; rank 0 then plays the master and
every other rank serves it with the worker loop; finally the rank leaves the world, whatever happened.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.rank_registry import register_rank
from proto.liveness import Heartbeat
from proto.topology import ProcessGroups, Topology
from server.launcher import init_rank, shutdown, world_store
from workers.score_rank import ScoreRank
from workers.worker_loop import run_worker_loop

BuildScoreRank = Callable[[ProcessGroups], ScoreRank]
Master = Callable[[ProcessGroups, dist.Store, ScoreRank | None], int]


def run_rank(topology: Topology, threads: int, build_score_rank: BuildScoreRank, master: Master) -> int:
    """Join the world as this process's rank, play its role, leave; returns the rank's exit code.

    ``build_score_rank(groups)`` runs on score ranks only (in a colocated topology rank 0 is one);
    ``master(groups, store, score_rank)`` runs on rank 0, with its score share or None.
    """
    torch.set_num_threads(threads)
    rank, groups = init_rank(topology)
    store = world_store()
    register_rank(store, rank)
    heartbeat = Heartbeat(store, rank).start()
    try:
        score_rank = build_score_rank(groups) if groups.is_worker else None
        if groups.is_master:
            return master(groups, store, score_rank)
        assert score_rank is not None
        return run_worker_loop(score_rank, groups, topology)
    finally:
        heartbeat.stop()
        shutdown()

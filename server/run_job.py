"""The rank entry of ``talkingmachines run``: every rank of the world runs ``main(argv)`` with the same args.

Rank 0 is the master (``server.master.run_master``; in a colocated topology it also holds a score share);
every other rank is a score worker serving the master (``workers.worker_loop.run_worker_loop``). Each rank
registers its process in the world's store and starts a heartbeat, so the master can name a rank that dies.
"""

from __future__ import annotations

import torch

from proto.liveness import Heartbeat
from proto.topology import ProcessGroups
from server.launcher import init_rank, shutdown, world_store
from server.master import run_master
from server.rank_registry import register_rank
from server.run_options import RunOptions, parse_run_options
from workers.factory import build_score_model
from workers.score_rank import ScoreRank
from workers.worker_loop import run_worker_loop


def build_score_rank(options: RunOptions, groups: ProcessGroups) -> ScoreRank:
    """This rank's score share: the DiT from ``--checkpoint``, or seeded random weights equal on all ranks."""
    model = build_score_model(options.preset, options.checkpoint, seed=options.seed, device=groups.device)
    return ScoreRank(model, options.stream_config(), groups)


def main(argv: list[str]) -> int:
    """Join the world, play this rank's role, leave the world; returns the rank's exit code."""
    options = parse_run_options(argv)
    torch.set_num_threads(options.threads)
    topology = options.topology()
    rank, groups = init_rank(topology)
    store = world_store()
    register_rank(store, rank)
    heartbeat = Heartbeat(store, rank).start()
    try:
        score_rank = build_score_rank(options, groups) if groups.is_worker else None
        if groups.is_master:
            return run_master(options, groups, store, score_rank)
        assert score_rank is not None
        return run_worker_loop(score_rank, groups, topology)
    finally:
        heartbeat.stop()
        shutdown()

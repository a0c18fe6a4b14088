"""The rank entry of ``talkingmachines run``: every rank of the world runs ``main(argv)`` with the same args.

Rank 0 is the master (``server.master.run_master``; in a colocated topology it also holds a score share);
every other rank is a score worker serving the master (``workers.worker_loop.run_worker_loop``). Each rank
registers its process in the world's store and starts a heartbeat (``server.rank_main``), so the master can
name a rank that dies.
"""

from __future__ import annotations

from proto.topology import ProcessGroups
from server.master import run_master
from server.rank_main import run_rank
from server.run_options import RunOptions, parse_run_options
from workers.factory import build_score_model
from workers.score_rank import ScoreRank


def build_score_rank(options: RunOptions, groups: ProcessGroups) -> ScoreRank:
    """This rank's score share: the DiT from ``--checkpoint``, or seeded random weights equal on all ranks,
    in ``--dtype``."""
    model = build_score_model(
        options.preset, options.checkpoint, seed=options.seed, dtype=options.torch_dtype, device=groups.device
    )
    return ScoreRank(model, options.stream_config(), groups, compile=options.compile_score)


def main(argv: list[str]) -> int:
    """Join the world, play this rank's role, leave the world; returns the rank's exit code."""
    options = parse_run_options(argv)
    return run_rank(
        options.topology(),
        options.threads,
        lambda groups: build_score_rank(options, groups),
        lambda groups, store, score_rank: run_master(options, groups, store, score_rank),
    )

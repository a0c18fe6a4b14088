"""The rank entry of ``talkingmachines run``: every rank of the world runs ``main(argv)`` with the same args.

Rank 0 is the master (``server.master.run_master``; in a colocated topology it also holds a score share);
every other rank is a score worker serving the master (``workers.worker_loop.run_worker_loop``). Each rank
registers its process in the world's store and starts a heartbeat (``server.rank_main``), so the master can
name a rank that dies. The TTBC study (``benchmarks.ttbc``) launches this same entry with ``run``'s
arguments (``--chunk-frames``, ``--pin-cores``, ``--rank-report`` among them).
"""

from __future__ import annotations

from server.master import run_master
from server.rank_main import run_rank
from server.run_options import parse_run_options


def main(argv: list[str]) -> int:
    """Join the world, play this rank's role, leave the world; returns the rank's exit code."""
    options = parse_run_options(argv)
    return run_rank(options, lambda groups, store, score_rank: run_master(options, groups, store, score_rank))

"""One rank's life in a serving group, shared by ``run``, ``serve`` and the TTBC study.

Every rank pins itself to its core (``--pin-cores``), joins the world, registers its process
(``engine.rank_registry``) and starts a heartbeat so the master can name a rank that dies; a score rank
builds its share of the DiT; rank 0 then plays the master and every other rank serves it with the worker
loop; finally the rank leaves the world, whatever happened, and writes its report (``--rank-report``,
``server.rank_report``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.rank_registry import register_rank
from proto.liveness import Heartbeat
from proto.topology import ProcessGroups
from server.launcher import init_rank, shutdown, world_store
from server.options import GroupOptions
from server.rank_report import ForwardCounter, RankReport, pin_to_core, planned_memory
from workers.attention import configure_attention_backend
from workers.factory import build_score_model
from workers.fp8 import convert_to_fp8, granularity_for, require_fp8
from workers.score_rank import ScoreRank
from workers.step_stage import build_stage_rank, run_stage_loop
from workers.worker_loop import run_worker_loop

Master = Callable[[ProcessGroups, dist.Store, ScoreRank | None], int]


def build_score_rank(
    options: GroupOptions, groups: ProcessGroups, report: RankReport | None = None
) -> ScoreRank:
    """This rank's score share: the DiT from ``--checkpoint``, or seeded random weights equal on all ranks,
    in ``--dtype``; with ``--fp8 linear`` its large linears in FP8 (checked on this rank's GPU before the
    weights load), its cache in ``--kv-cache-dtype``; its forwards are counted for ``report``."""
    if options.fp8 == "linear":
        require_fp8(groups.device)
    model = build_score_model(
        options.preset, options.checkpoint, seed=options.seed, dtype=options.torch_dtype, device=groups.device
    )
    if options.fp8 == "linear":
        convert_to_fp8(model, mode="scaled_mm", granularity=granularity_for(groups.device))
    if report is not None:
        report.forwards = ForwardCounter(model)
    # The backend group_options resolved for this device (the same on every rank), set in this process.
    configure_attention_backend(
        options.attention_backend, groups.device, options.torch_dtype, model.config.head_dim
    )
    speed = {
        "compile": options.compile_score,
        "cuda_graphs": options.cuda_graphs,
        "kv_cache_dtype": options.kv_cache_dtype,
    }
    if groups.topology.step_pipeline:  # one denoising step on its own cache slot (workers.step_stage)
        return build_stage_rank(model, options.stream_config(), groups, **speed)
    return ScoreRank(model, options.stream_config(), groups, **speed)


def run_rank(options: GroupOptions, master: Master, plan_sessions: int = 1) -> int:
    """Join the world as this process's rank, play its role, leave; returns the rank's exit code.

    Score ranks (in a colocated topology rank 0 is one) build their share with ``build_score_rank``;
    ``master(groups, store, score_rank)`` runs on rank 0, with its score share or None. ``plan_sessions``:
    the sessions the memory plan of the rank's report counts (``serve``'s ``max_sessions``).
    """
    rank = int(os.environ.get("RANK", "0"))
    cores = pin_to_core(rank, options.pin_cores)  # before torch starts its threads
    report = None if options.rank_report is None else RankReport(options.rank_report, rank, cores)
    topology = options.topology()
    torch.set_num_threads(options.threads)
    rank, groups = init_rank(topology)
    store = world_store()
    register_rank(store, rank)
    heartbeat = Heartbeat(store, rank).start()
    code: int | None = None
    try:
        score_rank = build_score_rank(options, groups, report) if groups.is_worker else None
        if groups.is_master:
            code = master(groups, store, score_rank)
        elif topology.step_pipeline:
            assert score_rank is not None
            code = run_stage_loop(score_rank, groups)
        else:
            assert score_rank is not None
            code = run_worker_loop(score_rank, groups, topology)
        return code
    finally:
        heartbeat.stop()
        shutdown()
        if report is not None:
            plan = functools.partial(planned_memory, options, rank, plan_sessions)
            report.write(topology.role(rank), groups.device, plan, code)

"""The rank entry of the TTBC benchmark: ``server.run_job``'s rank, pinned, with a chunk size and a dtype.

``benchmarks.ttbc`` launches every rank as ``benchmarks.ttbc_rank:main`` with ``server.launcher.launch``.
Each rank plays exactly the role ``server.run_job.main`` gives it (``server.master.run_master`` or
``workers.worker_loop.run_worker_loop``) with three additions the ``run`` command does not have:

- ``--chunk-frames F``: latent frames per chunk (``StreamConfig.chunk_latent_frames``; the paper's ablation
  uses 3 and 7). ``run`` always streams the default 3.
- ``--dtype fp32|bf16``: ``run --dtype float32|bfloat16`` under the benchmark's names (the DiT's and the
  encoders' dtype; bf16 also decodes under bfloat16 autocast, as ``run`` does).
- CPU pinning: with ``TM_TTBC_CORES=0,1`` in the environment, rank ``r`` pins itself to core
  ``cores[r % len(cores)]`` before torch starts its threads, so every rank owns one core and the cases
  are comparable on a small machine.

Before it leaves the world each rank writes ``rank<r>.json`` into ``TM_TTBC_RANK_DIR``: its role, its
cores and threads, its peak resident memory (``getrusage`` high-water mark), its peak CUDA allocation, how
many DiT forwards it ran (to turn a chunk's score time into a per-forward time), and its wall, CPU and
run-queue wait seconds (time it was ready to run but another process held its core).

    ranks' argv = [--chunk-frames F] [--dtype D] <the arguments of ``talkingmachines run``>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from server.master import run_master
from server.rank_main import run_rank
from server.run_options import RunOptions, parse_run_options
from workers.factory import build_score_model
from workers.score_rank import ScoreRank

CORES_ENV = "TM_TTBC_CORES"
RANK_DIR_ENV = "TM_TTBC_RANK_DIR"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RUN_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the benchmark's names -> ``run --dtype``


@dataclasses.dataclass(frozen=True)
class BenchRunOptions(RunOptions):
    """``RunOptions`` plus the chunk size (latent frames)."""

    chunk_latent_frames: int = 3

    def stream_config(self) -> StreamConfig:
        return dataclasses.replace(super().stream_config(), chunk_latent_frames=self.chunk_latent_frames)


def parse_bench_options(argv: list[str]) -> BenchRunOptions:
    """Split off ``--chunk-frames``/``--dtype``; the rest are ``talkingmachines run`` arguments."""
    parser = argparse.ArgumentParser(prog="benchmarks.ttbc_rank", add_help=False)
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ours, rest = parser.parse_known_args(argv)
    base = parse_run_options(rest)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(RunOptions)}
    fields["dtype"] = RUN_DTYPES[ours.dtype]  # the rank parser took --dtype: ``base`` holds run's auto
    options = BenchRunOptions(**fields, chunk_latent_frames=ours.chunk_frames)
    options.stream_config()  # validates the chunk size against the training window
    return options


def pin_to_core(rank: int, cores_spec: str | None) -> list[int]:
    """Pin every thread of this process to ``cores[rank % len(cores)]`` of ``cores_spec`` ("0,1");
    returns the affinity. Threads started later inherit it."""
    if cores_spec:
        cores = [int(c) for c in cores_spec.split(",")]
        core = {cores[rank % len(cores)]}
        # sched_setaffinity acts on one thread: pin those already running (imports may start some) too.
        for task in Path("/proc/self/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), core)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
    return sorted(os.sched_getaffinity(0))


def _cpu_and_wait() -> tuple[float, float | None]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, runqueue_wait_s()


class ForwardCounter:
    """Counts the DiT's forward passes (a hook on its output head, which every pass runs once — the
    streaming engine calls ``forward_step``, not ``forward`` — with no synchronisation, so it does not
    perturb timings)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.head.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.count += 1


def runqueue_wait_s() -> float | None:
    """Seconds this process's threads spent runnable but waiting for a core (``/proc/self/task/*/schedstat``
    field 2): how much other processes on its core slowed it down. None where the kernel does not say."""
    total = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            total += int((task / "schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def rank_report(
    rank: int,
    role: str,
    cores: list[int],
    forwards: int | None,
    device: torch.device,
    started: tuple[float, float, float | None],
) -> dict:
    """What one rank reports about itself at the end of the run (bytes, seconds, counts).

    ``started``: (perf_counter, CPU seconds, run-queue wait seconds) when ``main`` began; the report's
    seconds are counted from there (imports excluded).
    """
    cuda_peak = None
    if device.type == "cuda":
        cuda_peak = int(torch.cuda.max_memory_allocated(device))
    cpu, wait = _cpu_and_wait()
    return {
        "rank": rank,
        "role": role,
        "cores": cores,
        "threads": torch.get_num_threads(),
        # ru_maxrss is in KiB on Linux: the process's resident high-water mark over its whole life.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_allocated_bytes": cuda_peak,
        "dit_forwards": forwards,
        "wall_s": time.perf_counter() - started[0],
        "cpu_s": cpu - started[1],
        # Summed over the process's threads (compute, gloo, heartbeat, encoder): thread-seconds spent
        # runnable without a core, so it can exceed wall_s when several threads queue at once.
        "runqueue_wait_s": None if wait is None or started[2] is None else wait - started[2],
    }


def _planned(options: BenchRunOptions, rank: int) -> dict[str, int] | None:
    """What the start-up memory plan (``engine.memory_plan``) gave this rank, to set beside its measured
    peak (``cuda_peak_allocated_bytes`` on a GPU): everything but the margin, and the parts."""
    from engine.memory_plan import plan_for_options

    for planned in plan_for_options(options).ranks:
        if planned.rank == rank:
            return {"planned_bytes": planned.planned, "weights": planned.weights,
                    "kv_cache": planned.kv_cache, "decode_cache": planned.decode_cache,
                    "activations": planned.activations}  # fmt: skip
    return None


def main(argv: list[str]) -> int:
    """Join the world pinned to a core, play this rank's role, report, leave; returns the exit code."""
    started = (time.perf_counter(), *_cpu_and_wait())
    rank = int(os.environ["RANK"])
    cores = pin_to_core(rank, os.environ.get(CORES_ENV))
    options = parse_bench_options(argv)
    topology = options.topology()
    counter: list[ForwardCounter] = []
    devices: list[torch.device] = []

    def build_score_rank(groups: ProcessGroups) -> ScoreRank:
        devices.append(groups.device)
        model = build_score_model(
            options.preset, options.checkpoint, seed=options.seed, dtype=options.torch_dtype,
            device=groups.device,
        )
        counter.append(ForwardCounter(model))
        return ScoreRank(model, options.stream_config(), groups)

    def master(groups: ProcessGroups, store: Any, score_rank: ScoreRank | None) -> int:
        devices.append(groups.device)
        return run_master(options, groups, store, score_rank)

    code = run_rank(topology, options.threads, build_score_rank, master)
    out = os.environ.get(RANK_DIR_ENV)
    if out:
        forwards = counter[0].count if counter else None
        device = devices[0] if devices else torch.device(topology.device)
        report = rank_report(rank, topology.role(rank), cores, forwards, device, started)
        report["memory_plan"] = _planned(options, rank)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report) + "\n")
    return code

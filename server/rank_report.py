"""How one rank process runs on its machine and what it says about itself: ``--pin-cores`` and
``--rank-report`` (options of the group, ``server.options``; used by ``server.rank_main`` for ``run`` and
``serve`` alike, and by the TTBC study, ``benchmarks.ttbc``).

- ``pin_to_core``: rank ``r`` pins every thread of its process to core ``cores[r % len(cores)]`` before torch
  starts its threads, so every rank owns one core (comparable benchmark cases on a small machine; CPU
  serving without ranks fighting over cores).
- ``RankReport``: started when the rank starts, written as ``rank<r>.json`` when it exits: its role, cores
  and threads, its peak resident memory (``getrusage`` high-water mark), its peak CUDA allocation, how many
  DiT forwards it ran (``ForwardCounter``; to turn a chunk's score time into a per-forward time), its wall,
  CPU and run-queue wait seconds (time it was ready to run but another process held its core), its exit code,
  and what the start-up memory plan (``engine.memory_plan``) gave it, to set beside the measured peak.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def pin_to_core(rank: int, cores: tuple[int, ...] | list[int] | None) -> list[int]:
    """Pin every thread of this process to ``cores[rank % len(cores)]`` (nothing when ``cores`` is empty or
    None); returns the process's affinity. Threads started later inherit it."""
    if cores:
        core = {cores[rank % len(cores)]}
        # sched_setaffinity acts on one thread: pin those already running (imports may start some) too.
        for task in Path("/proc/self/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), core)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
    return sorted(os.sched_getaffinity(0))


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


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RankReport:
    """One rank's report, ``rank<r>.json`` in ``folder`` (bytes, seconds, counts).

    Create it when the rank starts (its seconds count from there); ``write`` it when the rank exits.
    """

    def __init__(self, folder: Path, rank: int, cores: list[int]) -> None:
        self.folder = folder
        self.rank = rank
        self.cores = cores
        self.forwards: ForwardCounter | None = None  # set by a score rank
        self._wall = time.perf_counter()
        self._cpu = _cpu_s()
        self._wait = runqueue_wait_s()

    def fields(self, role: str, device: torch.device, memory_plan: dict[str, int] | None) -> dict[str, Any]:
        cuda_peak = None
        if device.type == "cuda":
            cuda_peak = int(torch.cuda.max_memory_allocated(device))
        wait = runqueue_wait_s()
        return {
            "rank": self.rank,
            "role": role,
            "cores": self.cores,
            "threads": torch.get_num_threads(),
            # ru_maxrss is in KiB on Linux: the process's resident high-water mark over its whole life.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_peak_allocated_bytes": cuda_peak,
            "dit_forwards": None if self.forwards is None else self.forwards.count,
            "wall_s": time.perf_counter() - self._wall,
            "cpu_s": _cpu_s() - self._cpu,
            # Summed over the process's threads (compute, gloo, heartbeat, encoder): thread-seconds spent
            # runnable without a core, so it can exceed wall_s when several threads queue at once.
            "runqueue_wait_s": None if wait is None or self._wait is None else wait - self._wait,
            "memory_plan": memory_plan,
        }

    def write(
        self,
        role: str,
        device: torch.device,
        memory_plan: Callable[[], dict[str, int] | None],
        exit_code: int | None,
    ) -> Path | None:
        """Write ``rank<r>.json`` (``exit_code`` None: the rank raised). A report that fails is said on
        stderr, never raised: the rank's own outcome matters more."""
        path = self.folder / f"rank{self.rank}.json"
        try:
            report = {**self.fields(role, device, memory_plan()), "exit_code": exit_code}
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report) + "\n")
        except Exception as exc:  # the report is a side product of the rank
            print(
                f"talkingmachines: rank {self.rank}: no report {path}: {exc!r}", file=sys.stderr, flush=True
            )
            return None
        return path


def planned_memory(options: Any, rank: int, sessions: int = 1) -> dict[str, int] | None:
    """What the start-up memory plan (``engine.memory_plan``) gives ``rank`` of the group of ``options``:
    everything but the margin, and the parts (bytes)."""
    from engine.memory_plan import plan_for_options

    for planned in plan_for_options(options, sessions=sessions).ranks:
        if planned.rank == rank:
            return {"planned_bytes": planned.planned, "weights": planned.weights,
                    "kv_cache": planned.kv_cache, "decode_cache": planned.decode_cache,
                    "activations": planned.activations}  # fmt: skip
    return None

"""Real multi-process gloo worlds for tests: ``run_world(fn, world_size, tmp_path, *args)``.

``fn(rank, world_size, *args)`` runs in each of ``world_size`` spawned processes after
``init_process_group("gloo")`` (file:// rendezvous in ``tmp_path``); an exception or failed assert in any
rank fails the test with that rank's traceback. ``fn`` must be a module-level function.

Ranks are forked from a forkserver that has imported torch once per test session: on the shared 2-core
machine a fresh interpreter spends seconds importing torch, a fork from the preloaded server does not.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

THREADS_ENV = "TM_TEST_THREADS"  # torch threads per rank (default 1); tests/test_cpu_matrix.py sets 2


def rank_threads() -> int:
    return int(os.environ.get(THREADS_ENV, "1"))


def _child(
    rank: int, fn: Callable[..., None], world_size: int, init_file: str, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(rank_threads())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "proto.topology", "proto.wire", "dist_world"])


def run_world(fn: Callable[..., None], world_size: int, tmp_path: Path, *args: Any) -> None:
    mp.start_processes(_child, args=(fn, world_size, str(tmp_path / "rendezvous"), args), nprocs=world_size,
                       join=True, start_method="forkserver")

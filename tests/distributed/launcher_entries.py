"""Rank entry points for test_launcher.py, run by ``server.launcher.launch`` in separate processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.rank_registry import dead_ranks, register_rank
from proto.topology import Topology
from proto.wire import ChunkResult, Shutdown, broadcast_header, recv_header
from server.launcher import init_rank, shutdown, world_store
from tests.sockets import listening_sockets


def _record_pid(rank: int) -> None:
    Path(os.environ["TM_TEST_PID_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))


def exchange(args: list[str]) -> int:
    """Every rank adds rank+1 on ``data`` and receives the master's header on ``control``."""
    topology = Topology(int(args[0]), args[1])
    rank, groups = init_rank(topology, timeout_s=30)
    _record_pid(rank)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total, group=groups.data)
    header = broadcast_header(Shutdown("bye") if groups.is_master else None, groups.control, src=0,
                              timeout_s=10)
    shutdown()
    expected = sum(r + 1 for r in range(topology.world_size))
    return 0 if total.item() == expected and header == Shutdown("bye") else 1


def worker_killed(args: list[str]) -> int:
    """Rank 2 SIGKILLs itself mid-run while the master waits for its result and rank 1 for its broadcast."""
    topology = Topology(2, "dedicated")
    rank, groups = init_rank(topology, timeout_s=30)
    _record_pid(rank)
    dist.barrier(group=groups.control)
    if rank == 2:
        Path(os.environ["TM_TEST_PID_DIR"], "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if groups.is_master:
        recv_header(groups.control, src=2, expect=ChunkResult, timeout_s=30)
    else:
        dist.broadcast(torch.zeros(4), src=2, group=groups.data)
    shutdown()
    return 0


def sleeper(args: list[str]) -> int:
    """Every rank joins, records its pid, then sleeps until it is stopped."""
    topology = Topology(1, "dedicated")
    rank, _ = init_rank(topology, timeout_s=30)
    _record_pid(rank)
    time.sleep(120)
    shutdown()
    return 0


def worker_dies_server_goes_on(args: list[str]) -> int:
    """For ``launch(survive_workers=True)``: rank 2 SIGKILLs itself, rank 1 waits to be stopped, and rank 0
    — the launcher's own process — sees rank 2 gone in the rank registry (as ``serve`` does), records it and
    returns 0."""
    topology = Topology(2, "dedicated")
    rank, groups = init_rank(topology, timeout_s=30)
    _record_pid(rank)
    store = world_store()
    register_rank(store, rank)
    dist.barrier(group=groups.control)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1:
        time.sleep(120)
    deadline = time.monotonic() + 10
    while (dead := dead_ranks(store, [1, 2])) != [2]:
        if time.monotonic() > deadline:
            print(f"rank 0: dead ranks {dead} after 10 s, expected [2]")
            shutdown()
            return 1
        time.sleep(0.05)
    Path(os.environ["TM_TEST_PID_DIR"], "noticed").write_text(repr(time.time()))
    shutdown()
    return 0


def listeners(args: list[str]) -> int:
    """Once every rank is up, rank 0 writes ``listeners.json``: the TCP listening sockets of the launcher
    and all ranks (the store, the process groups' sockets)."""
    topology = Topology(1, "dedicated")
    rank, groups = init_rank(topology, timeout_s=30)
    _record_pid(rank)
    dist.barrier(group=groups.control)
    if groups.is_master:
        pid_dir = Path(os.environ["TM_TEST_PID_DIR"])
        pids = [os.getppid()] + [int(p.read_text()) for p in sorted(pid_dir.glob("rank*.pid"))]
        (pid_dir / "listeners.json").write_text(json.dumps(listening_sockets(pids)))
    dist.barrier(group=groups.control)
    shutdown()
    return 0


def workers_replaced(args: list[str]) -> int:
    """For ``launch(survive_workers=True)``: rank 0 stops (SIGSTOP) rank 2 as if it hung, replaces the
    workers (``local_workers().replace()``), joins the new world and checks that the new ranks answer; every
    rank adds rank+1 on ``data`` in each world and the workers then wait for the master's ``Shutdown``."""
    from server.launcher import local_workers

    topology = Topology(2, "dedicated")
    for world in (1, 2) if os.environ["RANK"] == "0" else (0,):
        rank, groups = init_rank(topology, timeout_s=30)
        pid_dir = Path(os.environ["TM_TEST_PID_DIR"])
        (pid_dir / f"port{os.environ['MASTER_PORT']}-rank{rank}.pid").write_text(str(os.getpid()))
        if rank == 0:
            with (pid_dir / "ports").open("a") as ports:
                ports.write(os.environ["MASTER_PORT"] + "\n")
        store = world_store()
        register_rank(store, rank)
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total, group=groups.data)
        if total.item() != sum(r + 1 for r in range(topology.world_size)):
            return 1
        if not groups.is_master:
            broadcast_header(None, groups.control, src=0)
            shutdown()
            return 0
        if world == 1:
            hung = int(store.get("tm/rank_process/2").decode().split()[1])
            os.kill(hung, signal.SIGSTOP)
            workers = local_workers()
            assert workers is not None
            workers.replace()
            shutdown()
    broadcast_header(Shutdown("bye"), groups.control, src=0, timeout_s=10)
    shutdown()
    return 0

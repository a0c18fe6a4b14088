"""Which process is which rank: every rank writes its host and pid into the world's store at start-up.

The master uses it for two things a broken collective cannot tell it: which rank actually died (a dead
non-leader worker surfaces on the master as a failure of the SP leader it was waiting for), and the memory
(RSS) of every rank on this machine after each chunk. Ranks on other machines fall back to
``proto.liveness`` heartbeats for liveness and are left out of the memory report.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

from engine.stats import rss_bytes
from proto.liveness import stale_ranks

_KEY = "tm/rank_process/{rank}"


def register_rank(store: dist.Store, rank: int) -> None:
    """Record this process as global rank ``rank`` (host name and pid)."""
    store.set(_KEY.format(rank=rank), f"{socket.gethostname()} {os.getpid()}")


def local_pids(store: dist.Store, ranks: list[int] | tuple[int, ...]) -> dict[int, int]:
    """Pids of the ranks among ``ranks`` that registered from this machine."""
    host = socket.gethostname()
    pids = {}
    for rank in ranks:
        key = _KEY.format(rank=rank)
        if not store.check([key]):
            continue
        rank_host, pid = store.get(key).decode().split()
        if rank_host == host:
            pids[rank] = int(pid)
    return pids


def _exited(pid: int) -> bool:
    """True when the process is gone or a zombie (killed, not yet reaped by its launcher)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def dead_ranks(
    store: dist.Store, ranks: list[int] | tuple[int, ...], heartbeat_age_s: float = 2.0
) -> list[int]:
    """The ranks among ``ranks`` that have exited (local ranks: by pid) or stopped heart-beating (remote)."""
    local = local_pids(store, ranks)
    dead = [rank for rank, pid in local.items() if _exited(pid)]
    remote = [rank for rank in ranks if rank not in local]
    if remote:
        dead += stale_ranks(store, remote, heartbeat_age_s)
    return sorted(dead)


def local_rss(store: dist.Store, ranks: list[int] | tuple[int, ...]) -> dict[int, int]:
    """RSS in bytes of every rank among ``ranks`` running on this machine."""
    out = {}
    for rank, pid in local_pids(store, ranks).items():
        value = rss_bytes(pid)
        if value is not None:
            out[rank] = value
    return out

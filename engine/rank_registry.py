"""Which process is which rank: every rank writes its host and pid into the world's store at start-up.

The master uses it for things a broken collective cannot tell it: which rank actually died (a dead
non-leader worker surfaces on the master as a failure of the SP leader it was waiting for), and the memory
(RSS) of every rank on this machine after each chunk. Ranks on other machines fall back to
``proto.liveness`` heartbeats for liveness and are left out of the memory report.

``RankWatch`` is what ``serve``'s health watcher polls: the score-worker ranks that died (a local process
gone, with its exit code or signal when the launcher knows it) or stopped responding (no heartbeat for the
silence limit, with the process state when it is local: a SIGSTOP-ed process is "stopped").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from engine.stats import rss_bytes
from proto.liveness import HeartbeatMonitor, stale_ranks

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


def process_state(pid: int) -> str | None:
    """The process's state letter from ``/proc`` (``R``, ``S``, ``D``, ``T`` stopped, ``t`` traced, ``Z``
    zombie…); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _exited(pid: int) -> bool:
    """True when the process is gone or a zombie (killed, not yet reaped by its launcher)."""
    return process_state(pid) in (None, "Z", "X")


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


@dataclass(frozen=True)
class RankFault:
    """A score-worker rank that died (``hung`` False) or stopped responding (``hung`` True)."""

    rank: int
    hung: bool
    detail: str  # "killed by SIGKILL", "no heartbeat for 5.1 s; its process is stopped (SIGSTOP)"…


class RankWatch:
    """The ranks among ``ranks`` that died or stopped responding (see the module docstring).

    Args:
        store: the world's store (rank registry and heartbeats).
        ranks: the ranks to watch (the score workers other than rank 0).
        silence_s: a rank whose heartbeat is older than this stopped responding.
        exit_status: the launcher's description of a local rank's exit ("killed by SIGKILL"), None while it
            runs or when unknown.
    """

    def __init__(
        self,
        store: dist.Store,
        ranks: list[int] | tuple[int, ...],
        silence_s: float,
        exit_status: Callable[[int], str | None] | None = None,
    ) -> None:
        self.store = store
        self.ranks = tuple(ranks)
        self.silence_s = silence_s
        self.exit_status = exit_status
        self.monitor = HeartbeatMonitor(store, self.ranks)
        self._pids: dict[int, int] = {}

    def faults(self) -> list[RankFault]:
        if len(self._pids) < len(self.ranks):  # ranks register right after they join; read until all did
            self._pids = local_pids(self.store, self.ranks)
        silent = self.monitor.silent_s()
        found = []
        for rank in self.ranks:
            pid = self._pids.get(rank)
            state = None if pid is None else process_state(pid)
            if pid is not None and state in (None, "Z", "X"):
                status = self.exit_status(rank) if self.exit_status is not None else None
                found.append(RankFault(rank, False, status or "its process exited"))
            elif silent[rank] > self.silence_s:
                found.append(RankFault(rank, True, self._hang_detail(silent[rank], pid, state)))
        return found

    @staticmethod
    def _hang_detail(silent_s: float, pid: int | None, state: str | None) -> str:
        detail = f"no heartbeat for {silent_s:.1f} s"
        if pid is None:
            return f"{detail}; it runs on another machine, which may also be unreachable"
        if state in ("T", "t"):
            return f"{detail}; its process (pid {pid}) is stopped, e.g. by SIGSTOP"
        return f"{detail}; its process (pid {pid}) is alive but stuck"

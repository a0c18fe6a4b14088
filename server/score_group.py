"""The master's handle on its score workers (``ScoreGroup``): the world it shares with them, the executor that
talks to them, what is wrong with them, and — when this server started them itself — their replacement.

``serve`` builds one on rank 0. ``faults()`` is what the health watcher polls (``engine.rank_registry
.RankWatch``: a worker that died, with its exit code or signal, or that stopped responding, with its
process state). ``renewal()`` is the ``server.group_health.Renewal`` of a group this process's launcher
started (``server.launcher.local_workers()``); under an external torchrun there is none, and a failed group
stays failed until the orchestrator restarts it.

``replace()`` runs on the engine thread: it kills the old workers (a stopped one too), leaves the old world
(``server.launcher.shutdown``), has the launcher bind a new store on a new port and start ranks 1.. again,
joins the new world as rank 0 (``init_rank``: the same rendezvous as at start-up), registers and heart-beats
there, and builds the executor for it — on a colocated group with its own score share rebuilt over the new
SP group (the weights are kept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from engine.executor import Executor
from engine.rank_registry import RankWatch, register_rank
from proto.liveness import Heartbeat
from proto.topology import ProcessGroups
from server.group_health import Renewal
from server.launcher import LocalWorkers, init_rank, shutdown, world_store
from workers.score_rank import ScoreRank

log = logging.getLogger(__name__)

MakeExecutor = Callable[[ProcessGroups, dist.Store, ScoreRank | None], Executor]


class ScoreGroup:
    """Rank 0's view of the score side (see the module docstring).

    Args:
        options: the group's options (``server.serve.ServeOptions``: the stream and ``--compile``).
        make_executor: the executor for rank 0's groups, the world's store and its score share.
        groups, store: rank 0's process groups and the world's store, as ``run_rank`` joined them.
        score_rank: rank 0's own score share (colocated topologies), else None.
        launched: the workers this process's launcher started (``local_workers()``), None under torchrun.
        heartbeat_timeout_s: a worker whose heartbeat is this old stopped responding.
    """

    def __init__(
        self,
        options: Any,
        make_executor: MakeExecutor,
        groups: ProcessGroups,
        store: dist.Store,
        score_rank: ScoreRank | None,
        launched: LocalWorkers | None,
        heartbeat_timeout_s: float,
    ) -> None:
        self.options = options
        self.make_executor = make_executor
        self.topology = groups.topology
        self.workers = [r for r in self.topology.worker_ranks if r != 0]
        self.launched = launched
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._heartbeat: Heartbeat | None = None  # rank 0's own, once it joined a world of its own making
        self._join(groups, store, score_rank)

    def faults(self) -> list[str]:
        """Descriptions of the score-worker ranks that died or stopped responding (the health watcher's)."""
        return [
            f"score worker rank {f.rank} ({self.topology.role(f.rank)}) "
            f"{'stopped responding' if f.hung else 'died'} ({f.detail})"
            for f in self.watch.faults()
        ]

    def renewal(self, max_restarts: int, window_s: float) -> Renewal:
        """Whether and how ``GroupHealth`` replaces this group (``--max-worker-restarts``, its window)."""
        if not self.workers:
            return Renewal()  # no score workers but rank 0: nothing to replace
        if self.launched is None:
            return Renewal(otherwise="its score workers were started by an external launcher (torchrun), so "
                           "this server cannot replace them: the orchestrator must restart the whole group")
        if max_restarts == 0:
            return Renewal(otherwise="replacing failed score workers is off (--max-worker-restarts 0): "
                           "restart the server")
        return Renewal(self.replace, self.launched.kill, max_restarts, window_s, "restart the server")

    def replace(self) -> Executor:
        """New workers in a new world (module docstring); the executor that talks to them. Engine thread."""
        assert self.launched is not None
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.launched.replace()  # kills and reaps the old workers first
        shutdown()  # leave the old world (no barrier: its other ranks are gone)
        log.info("joining the new world as rank 0 (store port %s)", self.launched.base_env["MASTER_PORT"])
        _, groups = init_rank(self.topology)
        store = world_store()
        register_rank(store, 0)
        self._heartbeat = Heartbeat(store, 0).start()
        score_rank = self._score_rank
        if score_rank is not None:  # its SP engine is bound to the old world's SP group; the weights stay
            model, stream = score_rank.engine.model, self.options.stream_config()
            options = self.options
            score_rank = ScoreRank(
                model,
                stream,
                groups,
                compile=options.compile_score,
                cuda_graphs=options.cuda_graphs,
                kv_cache_dtype=options.kv_cache_dtype,
            )
        self._join(groups, store, score_rank)
        return self.executor

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _join(self, groups: ProcessGroups, store: dist.Store, score_rank: ScoreRank | None) -> None:
        self._score_rank = score_rank
        self.executor = self.make_executor(groups, store, score_rank)
        exit_status: Callable[[int], str | None] | None = None
        if self.launched is not None:
            exit_status = self.launched.exit_status
        self.watch = RankWatch(store, self.workers, self.heartbeat_timeout_s, exit_status)

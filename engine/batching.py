"""Batched sessions in the chunk pipeline: ``BatchChunkEngine``, the ``ChunkEngine`` whose unit of work is a
batch of several sessions' chunks, scored together (``Executor.submit_batch`` → ``workers.batched``: one DiT
forward per pass for the sessions whose chunks share a cache geometry).

The pipeline is the one of ``engine.pipeline`` (submit batch t+1, decode batch t, prepare batch t+2, collect
t+1), with a batch where it had one chunk: which sessions form a batch is the owner's choice
(``BatchOwner.pick_batch``, ``engine.scheduler.pick_batch``: the most urgent due sessions, batched only when
no session loses a deadline the earliest-deadline-first order would keep), from the costs this engine
measures (``BatchCosts``: a batch of k's seconds, the executor's request-out-to-latents-in time plus the
sessions' decodes, per k; on a disaggregated group the decode overlaps the next batch's scoring, so this
over-estimates, which only makes the picker more careful). Every
session is then decoded and published as alone, with the batch's score seconds as its score stage. A batch of
one goes out as the ordinary ``ChunkRequest``, so ``--max-batch-sessions 1`` is the plain ``ChunkEngine``.

On a disaggregated group the first result of a batch comes once the whole batch is scored, so
``--chunk-timeout`` must cover a batch, not one chunk.

Failures: a ``WorkerError`` fails the group, as before; a session's own prepare or decode fails that
session; anything else while a batch is submitted or collected fails the batch's sessions (which of them
caused it cannot be told).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.degrade import DegradeConfig
from engine.executor import BatchExecutor, Executor, WorkerError
from engine.pipeline import ChunkEngine, DegradeMetrics, EngineOwner, Work
from engine.publish import ChunkPublisher, EngineSession
from engine.scheduler import BatchCosts, Cost
from proto.stream_config import StreamConfig

log = logging.getLogger(__name__)


class BatchOwner(EngineOwner, Protocol):
    """An ``EngineOwner`` that also picks batches."""

    def pick_batch(self, in_flight: Sequence[Work], max_sessions: int, cost: Cost) -> list[EngineSession]:
        """The sessions whose chunks go next together ([]: none is due); ``in_flight`` are being scored."""
        ...


@dataclass
class BatchWork:
    """Several sessions' chunks on their way through the engine together."""

    works: list[Work]


class BatchChunkEngine(ChunkEngine):
    """``ChunkEngine`` over batches of up to ``max_sessions`` sessions' chunks (see the module docstring)."""

    def __init__(
        self,
        executor: Executor,
        stream: StreamConfig,
        publisher: ChunkPublisher,
        owner: BatchOwner,
        max_sessions: int,
        *,
        overlap: bool = True,
        device: torch.device | None = None,
        degrade: DegradeConfig | None = None,
        degrade_metrics: DegradeMetrics | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if not callable(getattr(executor, "submit_batch", None)):
            raise ValueError(
                f"--max-batch-sessions {max_sessions}: the executor {type(executor).__name__} cannot score "
                "batches (no submit_batch); use --max-batch-sessions 1 with it"
            )
        super().__init__(
            executor,
            stream,
            publisher,
            owner,
            overlap=overlap,
            device=device,
            degrade=degrade,
            degrade_metrics=degrade_metrics,
        )
        self.batch_owner = owner
        self.max_sessions = max_sessions
        self.costs = BatchCosts()
        self.batch_sizes: list[int] = []  # every submitted batch's size (stats, tests)
        self._next_batch: BatchWork | None = None
        self._scored_batch: BatchWork | None = None
        self.in_flight_batch: BatchWork | None = None

    def busy(self) -> bool:
        return self.in_flight is not None or self._next_batch is not None or self._scored_batch is not None

    def reset(self) -> None:
        self._next_batch = self._scored_batch = None

    def turn(self) -> bool:
        for session_id, reason in self.publisher.failures():
            self.fail_session(session_id, reason)
        if not self.overlap:
            return self._serial_batch_turn()
        if self._next_batch is None:
            self._next_batch = self._prepare_batch(())
        batch, self._next_batch = self._schedulable(self._next_batch), None
        if batch is not None and not self._batch_step(batch, lambda: self._submit_batch(batch)):
            batch = None
        scored, self._scored_batch = self._scored_batch, None
        if scored is not None:  # decoded while the workers score `batch` (disaggregated)
            self._decode_batch(scored)
        if batch is None:
            return scored is not None
        if self._next_batch is None:  # prepared while the workers still score `batch`
            self._next_batch = self._prepare_batch(batch.works)
        self._batch_step(batch, lambda: self._collect_batch(batch))
        return True

    def _serial_batch_turn(self) -> bool:
        batch = self._schedulable(self._prepare_batch(()))
        if batch is None or not self._batch_step(batch, lambda: self._submit_batch(batch)):
            return False
        self._batch_step(batch, lambda: self._collect_batch(batch))
        scored, self._scored_batch = self._scored_batch, None
        if scored is not None:
            self._decode_batch(scored)
            self.publisher.wait_idle(timeout_s=float("inf"))
        return True

    # ---- steps ---------------------------------------------------------------------------------------

    def _prepare_batch(self, in_flight: Sequence[Work]) -> BatchWork | None:
        """The next batch: the owner's sessions, each prepared (a session whose prepare fails fails alone)."""
        sessions = self._guarded(
            None, lambda: self.batch_owner.pick_batch(in_flight, self.max_sessions, self.costs)
        )
        works = []
        for session in sessions or ():
            work = self._guarded(None, lambda session=session: self._prepare(session))
            if work is not None:
                works.append(work)
        return BatchWork(works) if works else None

    def _schedulable(self, batch: BatchWork | None) -> BatchWork | None:
        """The batch without the sessions closed or failed since it was prepared (None: none left)."""
        if batch is None:
            return None
        batch.works = [w for w in batch.works if self.owner.schedulable(w.session)]
        return batch if batch.works else None

    def _batch_step(self, batch: BatchWork, fn: Callable[[], object]) -> bool:
        """Run a step of the whole batch: a worker failure fails every session, any other failure the
        batch's sessions. False when it failed."""
        try:
            fn()
            return True
        except WorkerError as exc:
            self.owner.group_failed(str(exc))
        except Exception as exc:
            log.exception("a batch of %d sessions failed while generating", len(batch.works))
            for work in batch.works:
                self.fail_session(work.session.id, f"generation failed: {exc}")
        return False

    def _submit_batch(self, batch: BatchWork) -> None:
        works = batch.works
        self.in_flight = works[0]  # ChunkEngine.idle()/close_on_workers: something is in flight
        self.in_flight_batch = batch
        try:
            if len(works) == 1:
                self.executor.submit(works[0].prepared.request, works[0].prepared.tensors)
            else:
                executor: BatchExecutor = self.executor  # type: ignore[assignment]  # checked at __init__
                executor.submit_batch(
                    [w.prepared.request for w in works], [w.prepared.tensors for w in works]
                )
        except BaseException:
            self.in_flight = self.in_flight_batch = None
            raise
        self.batch_sizes.append(len(works))
        if len(works) > 1 and max(self.batch_sizes[:-1], default=1) < len(works):
            log.info("first batch of %d sessions' chunks scored together", len(works))

    def _collect_batch(self, batch: BatchWork) -> None:
        pending = [w.session.id for w in batch.works]
        try:
            for work in batch.works:
                work.scored = self.executor.collect(work.prepared.request)
                pending.pop(0)
        except BaseException:
            # Their replies may still be due on the wire (see ChunkEngine._collect): caches stay.
            self._reply_pending.update(pending)
            raise
        finally:
            self.in_flight = self.in_flight_batch = None
        self._scored_batch = batch
        closes, self._deferred_closes = self._deferred_closes, []
        for session_id in closes:
            self.close_on_workers(session_id)

    def _decode_batch(self, batch: BatchWork) -> None:
        """Decode and publish every session's chunk as alone; record the batch's cost."""
        start = time.perf_counter()
        for work in batch.works:
            self._guarded(work.session, lambda work=work: self._decode(work))
        decode_s = time.perf_counter() - start
        scored = [w.scored.roundtrip_s for w in batch.works if w.scored is not None]
        if scored:  # the executor's request-out-to-latent-in seconds (the batch's), plus the decodes
            self.costs.record(len(batch.works), max(scored) + decode_s)

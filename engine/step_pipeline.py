"""The master's transport for the step-pipeline topology (``--step-pipeline``): up to S chunks in flight.

``StepPipelineExecutor`` has the executors' interface (``engine.executor.Executor``) and adds
``max_in_flight`` = S, which ``engine.pipeline.ChunkEngine`` reads to keep that many chunks submitted and not
yet collected (every other executor allows one). The stages are ``workers.step_stage``.

Sending. Every message (``SessionOpen``, ``ChunkRequest``, ``SessionClose``, ``Shutdown``) goes to every stage
rank point to point: the header, then the tensors it declares, as host tensors, all on the gloo ``control``
group, posted (``isend``) and not waited for. A broadcast would not do: it is collective, so the master could
not hand chunk t + 1 to stage 0 while the last stage still works on chunk t, and a blocking send would wait
for the busiest stage while that stage waits for the master to take its result. Per destination the sends
arrive in the order posted, so every stage sees the same message sequence. The tensors stay on the host
and travel on gloo even on CUDA: a posted NCCL send to a busy stage would sit on the same communicator the
master later receives that stage's latent on (unverified on GPUs; on CPU everything is gloo anyway).

Completion. A chunk's result comes from the last stage, which has then received every message posted before
it, and so has every other stage (they took it earlier): ``collect`` waits for those sends (they are done)
and drops them. ``shutdown`` waits for all, bounded. Opens and closes never wait (the engine may send them
while chunks are in flight and a stage is blocked handing its result to this very thread).

Results and failures are the ``DedicatedExecutor``'s (the last stage's SP leader is the topology's
``sp_leader``): a ``ChunkResult`` + latent on ``data``, or ``WorkerFailed``; a deadline on each result; a
broken wait is turned into a ``WorkerError`` naming the rank that died (from the rank registry), whichever
stage it was in; a result that times out names the stage rank whose heartbeat stopped (a hung rank).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.executor import DedicatedExecutor, ScoredChunk, WorkerError, _key
from proto.liveness import PeerError, stale_ranks, wait_with_timeout
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.wire import (
    ChunkRequest,
    Message,
    SessionClose,
    SessionOpen,
    Shutdown,
    WireError,
    post_header,
)

# A message whose chunk's result has arrived was received by every stage: its sends are complete.
_DONE_WAIT_S = 5.0
# Shutdown: the stages take it once they finished what is in flight.
_SHUTDOWN_WAIT_S = 30.0
# A rank whose heartbeat (every 0.5 s) is older than this when a result is overdue has hung.
_HUNG_AFTER_S = 2.0


@dataclass
class _Posted:
    """One message's sends to every stage rank, and the host tensors they read (kept alive until done)."""

    what: str
    works: list[tuple[int, dist.Work]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    key: tuple[str, int] | None = None  # (session, chunk) of a ChunkRequest


class StepPipelineExecutor(DedicatedExecutor):
    """Transport of the step-pipeline topology (module docstring).

    Args:
        groups: rank 0's process groups (``Topology.step_stages`` > 1).
        store: the world's store (to name a dead rank).
        stream: the group's stream configuration (``ChunkResult`` specs per chunk).
        result_timeout_s: deadline for a chunk's result once ``collect`` starts waiting for it, seconds.
        recv_stream: CUDA side stream for the latent's receive (None on CPU).
    """

    def __init__(
        self,
        groups: ProcessGroups,
        store: dist.Store,
        stream: StreamConfig,
        result_timeout_s: float,
        recv_stream: torch.cuda.Stream | None = None,
    ) -> None:
        topology = groups.topology
        if not topology.step_pipeline:
            raise ValueError(f"StepPipelineExecutor needs a step-pipeline topology, not {topology.name!r}")
        super().__init__(groups, store, stream, result_timeout_s, send_stream=None, recv_stream=recv_stream)
        self.max_in_flight = topology.step_stages
        self._posted: list[_Posted] = []

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        self._post(message, tensors)

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        self._sent_at[_key(request)] = time.perf_counter()
        self._post(request, tensors, key=_key(request))

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        try:
            scored = super().collect(request)
        except WorkerError as exc:
            raise self._name_hung(exc) from exc
        self._retire(_key(request))
        return scored

    def _name_hung(self, exc: WorkerError) -> WorkerError:
        """A result that never came with no rank dead: the master waits on the last stage, but the stage that
        hung may be any; the one whose heartbeat stopped (``proto.liveness``) is named."""
        if "nothing arrived within" not in str(exc):
            return exc
        hung = stale_ranks(self._out.store, self.topology.worker_ranks, _HUNG_AFTER_S)
        if not hung:
            return exc
        return WorkerError(
            f"{self._out.names(hung)} of {self.topology.name!r} stopped responding (no heartbeat for "
            f"{_HUNG_AFTER_S:g} s); {exc}"
        )

    def close_session(self, message: SessionClose) -> None:
        self._post(message)

    def shutdown(self, reason: str) -> None:
        self._post(Shutdown(reason))
        self._wait(self._posted, _SHUTDOWN_WAIT_S)
        self._posted = []

    # ---- sending -----------------------------------------------------------------------------------

    def _post(
        self,
        message: Message,
        tensors: Mapping[str, torch.Tensor] | None = None,
        key: tuple[str, int] | None = None,
    ) -> None:
        """Post ``message`` and its tensors (host copies, checked against its specs) to every stage rank."""
        specs = getattr(message, "tensors", ())
        given = dict(tensors or {})
        if [s.name for s in specs] != list(given):
            raise WireError(
                f"{type(message).__name__}: declares {[s.name for s in specs]}, got {list(given)}"
            )
        host = {s.name: given[s.name].detach().to("cpu").contiguous() for s in specs}
        for spec in specs:
            spec.check(host[spec.name], f"{type(message).__name__} to the step stages")
        posted = _Posted(type(message).__name__, [], host, key)
        control = self.groups.control
        try:
            for rank in self.topology.worker_ranks:
                posted.works += [(rank, w) for w in post_header(message, control, dst=rank)]
                posted.works += [(rank, dist.isend(host[s.name], dst=rank, group=control)) for s in specs]
        except RuntimeError as exc:  # a peer already known gone
            raise self._out.lost_peer(f"sending {posted.what}", exc) from exc
        self._posted.append(posted)

    def _retire(self, key: tuple[str, int]) -> None:
        """The result of chunk ``key`` arrived: every message posted up to its request was received."""
        upto = next((i for i, p in enumerate(self._posted) if p.key == key), None)
        if upto is None:
            return
        done, self._posted = self._posted[: upto + 1], self._posted[upto + 1 :]
        self._wait(done, _DONE_WAIT_S)

    def _wait(self, posted: list[_Posted], timeout_s: float) -> None:
        for message in posted:
            for rank, work in message.works:
                what = f"sending {message.what} to rank {rank} ({self.topology.role(rank)})"
                try:
                    wait_with_timeout(work, timeout_s, what)
                except PeerError as exc:
                    raise self._out.lost_peer(what, exc) from exc
                except RuntimeError as exc:
                    if isinstance(exc, WorkerError):
                        raise
                    raise self._out.lost_peer(what, exc) from exc

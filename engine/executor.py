"""How the master talks to the score side: the transport, separate from the scheduler and the worker loop.

Two executors with one interface (``open_session``, ``submit``, ``collect``, ``close_session``,
``shutdown``); the scheduler and the pipeline never know which topology they run on (vLLM's engine /
executor / worker split):

- ``DedicatedExecutor`` (disaggregated N+1): rank 0 only masters. Each message is broadcast from rank 0 to
  every rank, header on the gloo ``control`` group first, then its tensors on ``data``; the SP leader
  answers each chunk with a ``ChunkResult`` header on ``control`` and the latent on ``data`` (or a
  ``WorkerFailed`` header). The result wait has a deadline, and a broken wait is turned into a
  ``WorkerError`` naming the rank that died.
- ``ColocatedExecutor`` (self-contained N): rank 0 is also a score worker (the SP leader). It broadcasts
  the same messages to ranks 1..N-1, then runs its own ``ScoreRank`` inline so the SP collectives of all
  ranks line up; the latent never leaves the process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from engine.rank_registry import dead_ranks
from proto.chunk_specs import chunk_result_specs
from proto.liveness import PeerError
from proto.staging import HostStaging
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.wire import (
    ChunkBatchRequest,
    ChunkRequest,
    ChunkResult,
    Message,
    SessionClose,
    SessionOpen,
    Shutdown,
    TensorSpec,
    Transfer,
    WireError,
    WorkerFailed,
    broadcast_header,
    broadcast_tensors,
    check_specs,
    recv_header,
    recv_tensors,
)

# A gloo send to a live peer completes at once; a header broadcast that takes longer is a hung world.
_HEADER_TIMEOUT_S = 30.0
# How long the master looks for the process that died after a collective broke (a killed process is
# reaped by the launcher within tens of milliseconds; a remote one needs a stale heartbeat).
_DIAGNOSE_S = 2.5


class WorkerError(RuntimeError):
    """The score side failed: a worker raised, died, or missed the result deadline. Names the rank."""


@dataclass
class ScoredChunk:
    """A chunk's clean latent on the master.

    latent: ``[16, F, h, w]`` float32 on the master's device. On CUDA it is only valid on a stream that
        waited for ``transfer`` (``transfer.wait(stream)``); ``transfer`` is None when the latent was
        produced on the master's current stream (colocated).
    score_s: the workers' denoising seconds. roundtrip_s: request out to latent in, seconds.
    """

    request: ChunkRequest
    latent: torch.Tensor
    score_s: float
    roundtrip_s: float
    transfer: Transfer | None = None


class Executor(Protocol):
    """The master's view of the score side."""

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def collect(self, request: ChunkRequest) -> ScoredChunk: ...

    def close_session(self, message: SessionClose) -> None: ...

    def shutdown(self, reason: str) -> None: ...


class BatchExecutor(Executor, Protocol):
    """An executor that also scores several sessions' chunks together (``--max-batch-sessions``; the three
    executors here are): ``submit_batch``, then each chunk ``collect``-ed on its own, in order."""

    def submit_batch(
        self, requests: Sequence[ChunkRequest], tensors: Sequence[Mapping[str, torch.Tensor]]
    ) -> None: ...


class ScoreRankLike(Protocol):
    """What ``workers.score_rank.ScoreRank`` offers the colocated master."""

    def open_session(self, msg: SessionOpen, tensors: dict[str, torch.Tensor]) -> None: ...

    def denoise(self, msg: ChunkRequest, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    def denoise_batch(
        self, msg: ChunkBatchRequest, tensors: dict[str, torch.Tensor]
    ) -> list[torch.Tensor] | None: ...

    def close_session(self, msg: SessionClose) -> None: ...


def _key(request: ChunkRequest) -> tuple[str, int]:
    """In-flight chunks are told apart by session and chunk: two sessions' chunk 3 are different chunks."""
    return request.session_id, request.chunk_index


def _contiguous(tensors: Mapping[str, torch.Tensor], staging: HostStaging) -> dict[str, torch.Tensor]:
    """The tensors on ``staging``'s device (host ones through its pinned buffers), contiguous."""
    return {name: staging.to_device(name, t.contiguous()) for name, t in tensors.items()}


class _Broadcaster:
    """Rank 0's side of the master -> all broadcast (header on control, tensors on data)."""

    def __init__(
        self, groups: ProcessGroups, store: dist.Store, send_stream: torch.cuda.Stream | None
    ) -> None:
        if not groups.is_master:
            raise ValueError(f"executors run on the master (rank 0), not on rank {groups.rank}")
        self.groups = groups
        self.store = store
        self.send_stream = send_stream
        self.staging = HostStaging(groups.device)
        self.topology = groups.topology

    def broadcast(self, message: Message, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        specs: Sequence[TensorSpec] = getattr(message, "tensors", ())
        what = f"broadcasting {type(message).__name__}"
        try:
            broadcast_header(message, self.groups.control, src=0, timeout_s=_HEADER_TIMEOUT_S)
            if specs:
                payload = _contiguous(tensors or {}, self.staging)
                broadcast_tensors(specs, self.groups.data, src=0, tensors=payload, stream=self.send_stream)
        except (PeerError, RuntimeError) as exc:
            if isinstance(exc, WireError):
                raise
            raise self.lost_peer(what, exc) from exc

    def find_dead(self, exclude: int | None = None, wait_s: float = _DIAGNOSE_S) -> list[int]:
        """Score-worker ranks (other than rank 0 and ``exclude``) that have died; polls up to ``wait_s``."""
        others = [r for r in self.topology.worker_ranks if r not in (0, exclude)]
        deadline = time.monotonic() + wait_s
        while others:
            dead = dead_ranks(self.store, others)
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)
        return []

    def names(self, ranks: list[int]) -> str:
        return "score worker " + ", ".join(f"rank {r} ({self.topology.role(r)})" for r in ranks)

    def lost_peer(self, what: str, exc: BaseException) -> WorkerError:
        """A collective broke: find the rank that died and say so."""
        dead = self.find_dead()
        if dead:
            return WorkerError(
                f"{self.names(dead)} of {self.topology.name!r} died while the master was {what}: {exc}"
            )
        return WorkerError(
            f"the score side of {self.topology.name!r} failed while the master was {what}: {exc}"
        )


class DedicatedExecutor:
    """Transport of a disaggregated topology: rank 0 sends requests, the SP leader returns latents.

    Args:
        groups: rank 0's process groups.
        store: the world's store (to name a dead rank).
        stream: the group's stream configuration: chunk i's ``ChunkResult`` must carry
            ``proto.chunk_specs.chunk_result_specs(stream, i)`` (chunks may differ in size: LiveAct's 6, then
            8 latent frames).
        result_timeout_s: deadline for a chunk's result after its request went out, seconds.
        send_stream, recv_stream: CUDA side streams for the data-group broadcast and receive (None on CPU).
    """

    def __init__(
        self,
        groups: ProcessGroups,
        store: dist.Store,
        stream: StreamConfig,
        result_timeout_s: float,
        send_stream: torch.cuda.Stream | None = None,
        recv_stream: torch.cuda.Stream | None = None,
    ) -> None:
        self._out = _Broadcaster(groups, store, send_stream)
        self.groups = groups
        self.topology = groups.topology
        self.stream = stream
        self.result_timeout_s = result_timeout_s
        self.recv_stream = recv_stream
        self._sent_at: dict[tuple[str, int], float] = {}  # (session, chunk) -> when its request went out

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        self._out.broadcast(message, tensors)

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        self._sent_at[_key(request)] = time.perf_counter()
        self._out.broadcast(request, tensors)

    def submit_batch(
        self, requests: Sequence[ChunkRequest], tensors: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """One ``ChunkBatchRequest`` to every rank; the SP leader answers each request in order."""
        batch = ChunkBatchRequest(tuple(requests))
        now = time.perf_counter()
        for request in requests:
            self._sent_at[_key(request)] = now
        self._out.broadcast(batch, batch.join(tensors))

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        leader = self.topology.sp_leader
        role = self.topology.role(leader)
        what = f"waiting for the result of chunk {request.chunk_index} from rank {leader} ({role})"
        try:
            header = recv_header(
                self.groups.control,
                leader,
                expect=(ChunkResult, WorkerFailed),
                timeout_s=self.result_timeout_s,
            )
            if isinstance(header, WorkerFailed):
                reported = (
                    f"rank {header.rank} ({self.topology.role(header.rank)}) reported: {header.error}"
                )
                # A leader whose SP peer died reports the broken all-to-all; name the rank that died.
                dead = self._out.find_dead(exclude=header.rank)
                if dead:
                    raise WorkerError(
                        f"{self._out.names(dead)} of {self.topology.name!r} died during chunk "
                        f"{request.chunk_index}; {reported}"
                    )
                raise WorkerError(f"score worker {reported} (chunk {request.chunk_index})")
            assert isinstance(header, ChunkResult)
            header.expect_reply_to(request)
            expected = chunk_result_specs(self.stream, request.chunk_index)
            check_specs(f"ChunkResult of chunk {request.chunk_index}", expected, header.tensors)
            transfer = recv_tensors(
                header.tensors,
                self.groups.data,
                leader,
                device=self.groups.device,
                stream=self.recv_stream,
                timeout_s=self.result_timeout_s,
            )
        except PeerError as exc:
            raise self._out.lost_peer(what, exc) from exc
        except RuntimeError as exc:
            if isinstance(exc, WorkerError | WireError):
                raise
            raise self._out.lost_peer(what, exc) from exc
        roundtrip = time.perf_counter() - self._sent_at.pop(_key(request))
        return ScoredChunk(
            request=request,
            latent=transfer.tensors["latent"],
            score_s=header.score_seconds,
            roundtrip_s=roundtrip,
            transfer=transfer if transfer.event is not None else None,
        )

    def close_session(self, message: SessionClose) -> None:
        self._out.broadcast(message)

    def shutdown(self, reason: str) -> None:
        self._out.broadcast(Shutdown(reason))


class InProcessExecutor:
    """The score side in this very process, with no other ranks (``training.evaluate``, tests): the
    ``ScoreRank`` denoises inline in ``submit``, the latent never leaves the process."""

    def __init__(self, score_rank: ScoreRankLike, device: torch.device | str = "cpu") -> None:
        self.score_rank = score_rank
        self.device = torch.device(device)
        self.staging = HostStaging(self.device)
        self._done: dict[tuple[str, int], ScoredChunk] = {}

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        self.score_rank.open_session(message, _contiguous(tensors, self.staging))

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        latent = self.score_rank.denoise(request, _contiguous(tensors, self.staging))
        if latent is None:
            raise WorkerError("the master's ScoreRank is not the SP leader: it returned no latent")
        elapsed = time.perf_counter() - start
        self._done[_key(request)] = ScoredChunk(request, latent, score_s=elapsed, roundtrip_s=elapsed)

    def submit_batch(
        self, requests: Sequence[ChunkRequest], tensors: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        """Score the batch inline; each chunk's score time is the batch's."""
        batch = ChunkBatchRequest(tuple(requests))
        start = time.perf_counter()
        joined = _contiguous(batch.join(tensors), self.staging)
        latents = self.score_rank.denoise_batch(batch, joined)
        if latents is None:
            raise WorkerError("the master's ScoreRank is not the SP leader: it returned no latents")
        elapsed = time.perf_counter() - start
        for request, latent in zip(requests, latents, strict=True):
            self._done[_key(request)] = ScoredChunk(request, latent, score_s=elapsed, roundtrip_s=elapsed)

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        return self._done.pop(_key(request))

    def close_session(self, message: SessionClose) -> None:
        self.score_rank.close_session(message)

    def shutdown(self, reason: str) -> None:
        pass


class ColocatedExecutor:
    """Transport of a self-contained topology: rank 0 broadcasts to ranks 1..N-1 and scores inline (its own
    share is an ``InProcessExecutor``); a peer lost during the SP collectives is named."""

    def __init__(self, groups: ProcessGroups, store: dist.Store, score_rank: ScoreRankLike) -> None:
        self._out = _Broadcaster(groups, store, send_stream=None)
        self.groups = groups
        self._local = InProcessExecutor(score_rank, groups.device)
        self._alone = groups.topology.world_size == 1

    def _broadcast(self, message: Message, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        if not self._alone:
            self._out.broadcast(message, tensors)

    def open_session(self, message: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        self._broadcast(message, tensors)
        self._local.open_session(message, tensors)

    def submit(self, request: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        self._broadcast(request, tensors)
        try:
            self._local.submit(request, tensors)
        except PeerError as exc:
            raise self._out.lost_peer(f"denoising chunk {request.chunk_index}", exc) from exc
        except RuntimeError as exc:
            if "Connection closed by peer" in str(exc) or "Connection reset by peer" in str(exc):
                raise self._out.lost_peer(f"denoising chunk {request.chunk_index}", exc) from exc
            raise

    def submit_batch(
        self, requests: Sequence[ChunkRequest], tensors: Sequence[Mapping[str, torch.Tensor]]
    ) -> None:
        batch = ChunkBatchRequest(tuple(requests))
        self._broadcast(batch, batch.join(tensors))
        what = f"denoising a batch of {len(requests)} sessions' chunks"
        try:
            self._local.submit_batch(requests, tensors)
        except PeerError as exc:
            raise self._out.lost_peer(what, exc) from exc
        except RuntimeError as exc:
            if "Connection closed by peer" in str(exc) or "Connection reset by peer" in str(exc):
                raise self._out.lost_peer(what, exc) from exc
            raise

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        return self._local.collect(request)

    def close_session(self, message: SessionClose) -> None:
        self._broadcast(message)
        self._local.close_session(message)

    def shutdown(self, reason: str) -> None:
        self._broadcast(Shutdown(reason))

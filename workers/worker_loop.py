"""The loop a score-worker rank runs: receive the master's messages, drive its ``ScoreRank``, reply.

For every rank that is not the master (ranks 1..N dedicated, 1..N−1 colocated). Per message:

1. the header arrives by broadcast from the master on ``control`` (gloo; an idle worker waits here, never
   inside NCCL);
2. the tensors the header declares arrive by broadcast on ``data`` — always, even for a header this rank
   will refuse, so the group never falls out of step; on CUDA on one side stream, which the compute stream
   then waits for by event (no device-wide synchronisation);
3. dispatch: ``SessionOpen`` → ``open_session``, ``ChunkRequest`` → ``denoise``, ``ChunkBatchRequest`` →
   ``denoise_batch``, ``SessionClose`` → ``close_session``, ``Shutdown`` → return 0;
4. dedicated topology, SP leader only: for a ``ChunkRequest`` send ``ChunkResult`` (control) + ``latent``
   (data, same side stream) to the master; for a ``ChunkBatchRequest`` one such reply per request, in order.

Failures. A ``WireError`` from the score rank (unknown session, wrong chunk index, shapes, dtypes) is raised
by every worker alike before any SP collective, so the group is still in step: the SP leader of a dedicated
topology answers ``WorkerFailed`` (the master reads it where it expects the next ``ChunkResult``; an error
on open/close is reported there too) and the loop goes on, so the master can still send ``Shutdown``. Any
other exception (or an unreadable header) leaves the group in an unknown state: the leader answers
``WorkerFailed`` if it can, the rank prints the error and the loop returns 1.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

import torch

from proto.chunk_specs import chunk_result_specs
from proto.topology import ProcessGroups, Topology
from proto.wire import (
    ChunkBatchRequest,
    ChunkRequest,
    ChunkResult,
    Message,
    SessionClose,
    SessionOpen,
    Shutdown,
    WireError,
    WorkerFailed,
    broadcast_header,
    broadcast_tensors,
    send_header,
    send_tensors,
)
from workers.score_rank import ScoreRank

MASTER_MESSAGES = (SessionOpen, ChunkRequest, SessionClose, Shutdown, ChunkBatchRequest)


def run_worker_loop(score_rank: ScoreRank, groups: ProcessGroups, topology: Topology | None = None) -> int:
    """Serve the master until ``Shutdown`` (→ 0) or an unrecoverable error (→ 1, after reporting it)."""
    topology = topology or groups.topology
    if groups.is_master:
        raise ValueError(
            "run_worker_loop runs on score-worker ranks only; rank 0 (the master) drives its ScoreRank inline"
        )
    master = topology.master_rank
    replies = topology.disaggregated and groups.is_sp_leader
    # One side stream for every data-group op of this rank: NCCL must not see one communicator used from
    # two streams at once.
    data_stream = torch.cuda.Stream() if groups.device.type == "cuda" else None
    while True:
        try:
            msg = broadcast_header(None, groups.control, src=master, expect=MASTER_MESSAGES)
        except WireError as exc:
            return _fatal(groups, replies, master, f"unreadable header from the master: {exc}")
        if isinstance(msg, Shutdown):
            return 0
        declared = getattr(msg, "tensors", ())
        tensors = broadcast_tensors(
            declared, groups.data, src=master, device=groups.device, stream=data_stream
        ).wait()
        try:
            _dispatch(score_rank, msg, tensors, groups, replies, master, data_stream)
        except WireError as exc:
            if replies:
                send_header(WorkerFailed(rank=groups.rank, error=str(exc)), groups.control, dst=master)
        except Exception as exc:
            return _fatal(groups, replies, master, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _dispatch(
    score_rank: ScoreRank,
    msg: Message,
    tensors: dict[str, torch.Tensor],
    groups: ProcessGroups,
    replies: bool,
    master: int,
    data_stream: torch.cuda.Stream | None,
) -> None:
    if isinstance(msg, SessionOpen):
        score_rank.open_session(msg, tensors)
    elif isinstance(msg, SessionClose):
        score_rank.close_session(msg)
    elif isinstance(msg, ChunkRequest):
        start = time.perf_counter()
        latent = score_rank.denoise(msg, tensors)
        if replies:
            if latent is None:
                raise RuntimeError(f"rank {groups.rank} is the SP leader but ScoreRank returned no latent")
            _reply(score_rank, msg, latent, time.perf_counter() - start, groups, master, data_stream)
    elif isinstance(msg, ChunkBatchRequest):  # one ChunkResult per request, in order (batched sessions)
        start = time.perf_counter()
        latents = score_rank.denoise_batch(msg, tensors)
        if replies:
            if latents is None:
                raise RuntimeError(f"rank {groups.rank} is the SP leader but ScoreRank returned no latents")
            seconds = time.perf_counter() - start  # the batch's, reported for each of its chunks
            for request, latent in zip(msg.requests, latents, strict=True):
                _reply(score_rank, request, latent, seconds, groups, master, data_stream)


def _reply(
    score_rank: ScoreRank,
    msg: ChunkRequest,
    latent: torch.Tensor,
    seconds: float,
    groups: ProcessGroups,
    master: int,
    data_stream: torch.cuda.Stream | None,
) -> None:
    """The SP leader's ``ChunkResult`` + latent for ``msg`` to the master."""
    specs = chunk_result_specs(score_rank.stream, msg.chunk_index)  # chunk sizes may differ
    # Host wall time of the denoise call; on CUDA it ends when the kernels are queued, and the
    # master's receive of the latent is the honest end of the score stage.
    result = ChunkResult(
        session_id=msg.session_id,
        chunk_index=msg.chunk_index,
        score_seconds=seconds,
        tensors=specs,
    )
    send_header(result, groups.control, dst=master)
    send_tensors(specs, {"latent": latent}, groups.data, dst=master, stream=data_stream)


def _fatal(groups: ProcessGroups, replies: bool, master: int, error: str, trace: str = "") -> int:
    print(f"talkingmachines: rank {groups.rank} ({groups.role}): {error}\n{trace}", file=sys.stderr,
          flush=True)
    if replies:
        # If the master is gone too, the exit code tells the launcher.
        with contextlib.suppress(RuntimeError):
            send_header(WorkerFailed(rank=groups.rank, error=error), groups.control, dst=master)
    return 1

"""A step-pipeline stage: one denoising step of every chunk, on that step's KV cache slot only.

The step-pipeline topology (``--step-pipeline``, ``proto.topology.Topology.step_stages`` = S, one stage per
denoising step; LiveAct's timestep-forcing pipeline parallelism) splits a chunk's S passes over S stages of
N ranks each (N = ``--score-workers``, each stage one Ulysses SP group). Per chunk t:

1. the master sends the ``ChunkRequest`` header and its tensors to every rank of every stage (point to point,
   on the gloo ``control`` group, host tensors; ``engine.step_pipeline.StepPipelineExecutor``) without
   waiting, so up to S chunks are in flight;
2. stage 0 starts from the chunk's noise x_T = noise[0]; stage s > 0 receives x_s from the rank with its own
   SP index in stage s − 1 (``data`` group; every SP rank holds the whole latent, so no broadcast);
3. stage s runs one pass at timestep t_s on its cache slot (writing the chunk's step-s keys/values there),
   x0 = x_s − σ_s·v; a stage s < S − 1 re-noises, x_{s+1} = (1 − σ_{s+1})·x0 + σ_{s+1}·noise[s + 1], and
   sends it on (with the seconds spent so far, so the master's ``score`` time is the sum of the stages'); the
   last stage's SP leader answers the master with ``ChunkResult`` + latent as a dedicated group's leader does.

Why the stages overlap: in ``per-step`` cache mode chunk t + 1 at step s attends only to c_0 and c_t at step
s, which stage s wrote itself while processing chunk t. So stage 0 takes chunk t + 1 as soon as it has handed
chunk t on; a chunk's latency stays a full pass (plus S − 1 hand-offs), throughput is up to S times one
rank's.
The result equals one rank's ``StreamingDiT.denoise_chunk`` (the same passes on the same inputs, the slot
index aside) within float32 rounding (tests/workers/test_step_pipeline.py: <= 1e-5).

Every stage rank holds the whole DiT, the session's cross-attention K/V and ONE self-attention cache slot
(``StepStageDiT``: 1/S of a 1+N rank's self-attention cache; ``engine.memory_plan``).

Failures, as in ``workers.worker_loop``: a ``WireError`` (unknown session, wrong chunk index, shapes) is
raised by every stage alike before any hand-off, so the pipeline stays in step, and the last stage's SP leader
answers ``WorkerFailed``; any other error ends the rank (exit 1; the last leader first tells the master). A
hand-off to or from a rank that died raises ``proto.liveness.PeerError`` (exit code ``EXIT_PEER_LOST`` from
the launcher, never named the root cause); the master names the dead rank from the rank registry.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from proto.chunk_specs import chunk_result_specs
from proto.liveness import PeerError
from proto.step_pipeline import check_step_pipeline
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.wire import (
    ChunkRequest,
    ChunkResult,
    Message,
    SessionClose,
    SessionOpen,
    Shutdown,
    WireError,
    WorkerFailed,
    recv_header,
    recv_tensors,
    send_header,
    send_tensors,
)
from workers.audio import AudioConditioning
from workers.kv_cache import ChunkKVCache
from workers.model import WanModel
from workers.sampler import predict_x0, renoise
from workers.score_rank import ScoreRank
from workers.streaming import SessionState, StreamingDiT

MASTER_MESSAGES = (SessionOpen, ChunkRequest, SessionClose, Shutdown)

# Receives the stage's input latent x_s [16, F, h, w] float32 (shape, device) from the previous stage.
Receive = Callable[[tuple[int, ...], torch.device], torch.Tensor]


class StepStageDiT(StreamingDiT):
    """A ``StreamingDiT`` that runs denoising step ``step`` only, on a session cache of one slot.

    ``open_session`` and ``close_session`` as the base class, with one cache slot and the time embedding of
    step ``step`` only. ``denoise_chunk`` runs the one pass of chunk t at step ``step``: its input is
    ``noise[0]`` on stage 0 and ``receive(shape, device)`` (set by the stage loop: the previous stage's
    x_step) otherwise; it returns the next stage's input ``renoise(x0, σ_{step+1}, noise[step + 1])``, or x0
    ``[16, F, h, w]`` on the last stage. Chunks come in order, as for the base class.
    """

    def __init__(
        self,
        model: WanModel,
        stream: StreamConfig,
        step: int,
        sp_group: dist.ProcessGroup | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        kv_cache_dtype: str = "auto",
    ) -> None:
        check_step_pipeline(stream, stream.num_steps, model.config.name)
        super().__init__(
            model,
            stream,
            sp_group=sp_group,
            compile=compile,
            cuda_graphs=cuda_graphs,
            kv_cache_dtype=kv_cache_dtype,
        )
        if not 0 <= step < len(self.timesteps):
            raise ValueError(f"step {step} is outside the {len(self.timesteps)} denoising steps")
        self.step = step
        self.last = step == len(self.timesteps) - 1
        self.receive: Receive | None = None

    @property
    def passes_per_chunk(self) -> int:
        return 1

    def open_session(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> SessionState:
        """A session with one cache slot (this step's) and this step's time embedding; context
        `[Lt, text_dim]` and clip_fea `[clip_tokens, clip_dim]` as for the base class."""
        model, stream = self.model, self.stream
        cfg = model.config
        param = next(model.parameters())
        with torch.no_grad():
            cross_kv = model.cross_attention_kv(
                context[None].to(param.device), None if clip_fea is None else clip_fea[None].to(param.device)
            )
            t = torch.full((1, stream.chunk_latent_frames), self.timesteps[self.step], dtype=torch.float64)
            time_emb = [model.time_embed(t.to(param.device))]
        if stream.position_mode == "window":  # every chunk position's table, once per engine (as the base)
            last = stream.train_latent_frames // stream.chunk_latent_frames + 1
            for start in sorted({self.chunk_start(i) for i in range(last + 1)}):
                self._table(("chunk", start), param.device)
        cache = ChunkKVCache(
            num_layers=cfg.num_layers,
            num_slots=1,
            batch=1,
            tokens=stream.tokens_per_chunk,
            heads=cfg.num_heads // self.sp_degree,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
            kv_dtype=self.kv_cache_dtype,
        )
        return SessionState(cross_kv=cross_kv, cache=cache, time_emb=time_emb)

    @torch.no_grad()
    def denoise_chunk(
        self,
        state: SessionState,
        chunk_index: int,
        *,
        y: torch.Tensor | None = None,
        audio: AudioConditioning | None = None,  # type: ignore[override]
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Chunk `chunk_index`'s pass at this stage's step (class docstring); noise `[S, 16, F, h, w]` as the
        base class (drawn from `generator` when None; every stage must draw the same). `steps` must be the
        full schedule: a stage is one step of every chunk, so a degraded chunk has no place in the pipe."""
        if steps and tuple(steps) != tuple(range(len(self.timesteps))):
            raise ValueError(
                f"step_indices {tuple(steps)}: a step pipeline runs every denoising step of every chunk "
                "(one stage each); --degrade steps cannot be combined with --step-pipeline"
            )
        if chunk_index != state.next_chunk:
            raise ValueError(
                f"chunk {chunk_index} requested but the session expects chunk {state.next_chunk}; chunks are "
                "causal and must be denoised in order"
            )
        param = next(self.model.parameters())
        shape = (len(self.timesteps), *self.stream.latent_shape(chunk_index))
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [steps, 16, F, h, w] = {shape}")
        noise = noise.to(param.device)
        if self.step == 0:
            x = noise[0]
        else:
            if self.receive is None:
                raise RuntimeError(f"step stage {self.step} has no receive(): run it under run_stage_loop")
            x = self.receive(tuple(shape[1:]), param.device)
        if y is not None:
            y = y.to(param.device)
        shift = self.previous_shift(chunk_index)
        if shift:  # the window stopped moving: c_{t−1} moves back, once per chunk, in place (as the base)
            cos, sin = self._table(("shift", shift), param.device)
            state.cache.shift_position(state.cache.position(chunk_index - 1), cos, sin, self._shift_work)
        rope, audio_kv, face_mask = self.chunk_inputs(chunk_index, audio, param.device)
        v = self._forward(state, x, 0, chunk_index, y, rope, state.time_emb[0], audio_kv, face_mask=face_mask)
        x0 = predict_x0(x, v.to(x.dtype), self.sigmas[self.step])
        state.next_chunk += 1
        if self.last:
            return x0
        return renoise(x0, self.sigmas[self.step + 1], noise[self.step + 1])


def build_stage_rank(
    model: WanModel,
    stream: StreamConfig,
    groups: ProcessGroups,
    compile: bool = False,
    cuda_graphs: bool = False,
    kv_cache_dtype: str = "auto",
) -> ScoreRank:
    """The ``ScoreRank`` of a stage rank: wire validation as every score rank, over a ``StepStageDiT`` of
    this rank's stage on its stage's SP group. Every stage rank but the last stage's non-leaders returns
    its output (it is sent on)."""
    topology = groups.topology
    stage = groups.stage
    if not topology.step_pipeline or stage is None:
        raise ValueError(f"rank {groups.rank} ({groups.role}) is not a step-pipeline stage rank")
    engine = StepStageDiT(
        model,
        stream,
        stage,
        sp_group=groups.sp,
        compile=compile,
        cuda_graphs=cuda_graphs,
        kv_cache_dtype=kv_cache_dtype,
    )
    score_rank = ScoreRank(engine, stream, groups)
    score_rank.is_leader = stage < topology.step_stages - 1 or groups.sp_rank == 0
    return score_rank


def _lost_peer(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, PeerError)
        or "Connection closed by peer" in text
        or "Connection reset by peer" in text
    )


class _Handoff:
    """This rank's links to the stages around it: the rank with its SP index in stage s − 1 and s + 1."""

    def __init__(self, groups: ProcessGroups) -> None:
        topology = groups.topology
        stage, sp_rank = groups.stage, groups.sp_rank
        assert stage is not None and sp_rank is not None
        self.groups = groups
        self.prev = topology.stage_ranks(stage - 1)[sp_rank] if stage > 0 else None
        self.next = topology.stage_ranks(stage + 1)[sp_rank] if stage < topology.step_stages - 1 else None
        self.upstream_s = 0.0  # the previous stages' seconds for the chunk being received
        self.waited_s = 0.0  # how long this rank waited for that latent (not score time)

    def receive(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """x_s from the previous stage, then its seconds so far (float64 ``[1]``)."""
        assert self.prev is not None
        x = torch.empty(shape, dtype=torch.float32, device=device)
        seconds = torch.zeros(1, dtype=torch.float64, device=device)
        start = time.perf_counter()
        try:
            dist.recv(x, src=self.prev, group=self.groups.data)
            dist.recv(seconds, src=self.prev, group=self.groups.data)
        except RuntimeError as exc:
            raise PeerError(
                f"rank {self.prev} ({self.groups.topology.role(self.prev)}) did not hand on its latent: {exc}"
            ) from exc
        self.upstream_s = float(seconds.item())
        self.waited_s = time.perf_counter() - start
        return x

    def send(self, x: torch.Tensor, seconds: float) -> None:
        """x_{s+1} and the seconds spent on the chunk so far, to the next stage."""
        assert self.next is not None
        stamp = torch.tensor([seconds], dtype=torch.float64, device=x.device)
        try:
            dist.send(x.contiguous(), dst=self.next, group=self.groups.data)
            dist.send(stamp, dst=self.next, group=self.groups.data)
        except RuntimeError as exc:
            raise PeerError(
                f"rank {self.next} ({self.groups.topology.role(self.next)}) did not take the latent: {exc}"
            ) from exc


def run_stage_loop(score_rank: ScoreRank, groups: ProcessGroups) -> int:
    """Serve the master as a step-pipeline stage rank until ``Shutdown`` (→ 0) or an unrecoverable error
    (→ 1 after reporting it; a lost neighbour raises ``PeerError``). ``score_rank`` from
    ``build_stage_rank``."""
    topology = groups.topology
    if not isinstance(score_rank.engine, StepStageDiT) or groups.stage is None:
        raise ValueError(
            "run_stage_loop runs a step-pipeline stage rank with a ScoreRank from build_stage_rank"
        )
    master = topology.master_rank
    replies = groups.rank == topology.sp_leader  # the last stage's SP leader answers the master
    handoff = _Handoff(groups)
    score_rank.engine.receive = handoff.receive
    while True:
        try:
            msg = recv_header(groups.control, src=master, expect=MASTER_MESSAGES)
            tensors = recv_tensors(getattr(msg, "tensors", ()), groups.control, src=master).wait()
        except WireError as exc:
            return _fatal(groups, replies, f"unreadable message from the master: {exc}")
        except RuntimeError as exc:
            raise PeerError(f"rank {groups.rank} ({groups.role}) lost the master: {exc}") from exc
        if isinstance(msg, Shutdown):
            return 0
        try:
            _dispatch(score_rank, msg, tensors, groups, handoff, replies)
        except WireError as exc:
            if replies:
                send_header(WorkerFailed(rank=groups.rank, error=str(exc)), groups.control, dst=master)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if _lost_peer(exc):
                _report(groups, replies, error)
                raise PeerError(error) from exc
            return _fatal(groups, replies, error, traceback.format_exc())


def _dispatch(
    score_rank: ScoreRank,
    msg: Message,
    tensors: dict[str, torch.Tensor],
    groups: ProcessGroups,
    handoff: _Handoff,
    replies: bool,
) -> None:
    if isinstance(msg, SessionOpen):
        score_rank.open_session(msg, tensors)
    elif isinstance(msg, SessionClose):
        score_rank.close_session(msg)
    elif isinstance(msg, ChunkRequest):
        handoff.upstream_s = handoff.waited_s = 0.0
        start = time.perf_counter()
        out = score_rank.denoise(msg, tensors)
        # Score time = the stages' own compute, summed along the pipe (waits for a busy neighbour excluded).
        seconds = handoff.upstream_s + time.perf_counter() - start - handoff.waited_s
        if handoff.next is not None:
            assert out is not None
            handoff.send(out, seconds)
        elif replies:
            assert out is not None
            specs = chunk_result_specs(score_rank.stream, msg.chunk_index)
            result = ChunkResult(msg.session_id, msg.chunk_index, score_seconds=seconds, tensors=specs)
            send_header(result, groups.control, dst=groups.topology.master_rank)
            send_tensors(specs, {"latent": out}, groups.data, dst=groups.topology.master_rank)


def _report(groups: ProcessGroups, replies: bool, error: str) -> None:
    print(f"talkingmachines: rank {groups.rank} ({groups.role}): {error}", file=sys.stderr, flush=True)
    if replies:
        with contextlib.suppress(RuntimeError):  # the master may be gone too
            send_header(
                WorkerFailed(rank=groups.rank, error=error), groups.control, dst=groups.topology.master_rank
            )


def _fatal(groups: ProcessGroups, replies: bool, error: str, trace: str = "") -> int:
    _report(groups, replies, f"{error}\n{trace}")
    return 1

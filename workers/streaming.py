"""Chunked streaming of the DiT, endlessly, in fixed memory, in one of two attention windows
(`StreamConfig.window`, chosen by data): `sparse-causal` (TalkingMachines: chunk t attends to c_0, c_{t−1}
and itself) or `convkv-memory` (SoulX-LiveAct: a 14-frame window of sink, ConvKV-compressed memory,
neighbours and the current chunk; at the end of this docstring).

API (one engine per model, one `SessionState` per stream), the same for both windows:

    engine = StreamingDiT(model, stream_cfg)
    state = engine.open_session(context, clip_fea)          # text/image cross-attention K/V, computed once
    x0 = engine.denoise_chunk(state, 0, y=y_chunk, audio=audio_chunk, noise=noise)   # [16, F_0, h, w]
    x0 = engine.denoise_chunk(state, 1, ...)                 # chunks must come in order
    engine.close_session(state)                              # frees the caches

Chunk i has `stream.frames_in_chunk(i)` latent frames (noise `[S, *stream.latent_shape(i)]`); only the
convkv-memory window has a first chunk of another size (6, then 8).

The sparse-causal window. Cache modes (StreamConfig.cache_mode):
- `per-step`: the chunk's keys/values at denoising step s are kept as KV_s; chunk t at step s attends to
  KV_s of c_0 and c_{t−1}. The timestep is shared by all chunks, as in training, so this equals a
  full-sequence forward over every chunk's step-s latents with the sparse block mask. A chunk costs exactly
  len(steps) forward passes.
- `clean-context`: every step attends to clean keys/values of c_0 and c_{t−1}; after the last step one
  extra pass at t = 0 on the predicted x0 writes this chunk's clean keys/values (CausVid / Self-Forcing).

Positions (StreamConfig.position_mode), in latent frames, F = chunk frames, T = training clip frames:
- `absolute`: chunk t at F·t … F·t + F − 1;
- `window`: chunk t at min(F·t, T − F) …, i.e. its training-clip position while inside the clip and the
  clip's last chunk afterwards. c_0 is always at 0 … F − 1 and c_{t−1} right before the current chunk, so the
  stream never leaves the trained range.

The static step (what every pass reuses is built once, nothing per step is allocated by the engine itself):
- at session open: the time embeddings of every pass (`SessionState.time_emb`; the schedule is fixed), and,
  once per engine and device, the float32 RoPE tables of every chunk position (window mode; absolute mode
  builds the chunk's table once per chunk) and of the temporal shift of the previous chunk;
- per chunk: the audio projection and every block's audio keys/values (`WanModel.audio_kv`), the
  face mask's SP band, and, when the window has stopped moving, one in-place rotation of the previous
  chunk's cached keys (`ChunkKVCache.shift_position`);
- per pass: `WanModel.forward_step` writes each block's rotated keys/values in place into the session's
  preallocated cache and attends over one view of it (`workers.kv_cache`: keys are stored rotated, c_0
  rotated once when stored). No host→device copy and no host sync happens inside the denoising loop.
- `compile=True` (`--compile`): every block runs `torch.compile`d (inductor); the first chunks compile
  (one graph per distinct (write offset, visible length) of the cache: chunks 0, 1, then even/odd).
  Compiled and eager agree within float32 rounding (tests/workers/test_streaming_static.py states it).
- `cuda_graphs=True` (`--cuda-graphs`, CUDA only): `_forward` hands each pass to `workers.cuda_graphs`, which
  captures one graph per distinct pass (the keys above, per session) after an eager warm-up and replays it
  with the pass's fresh inputs copied into static buffers (tests/workers/test_cuda_graphs.py, on a fake
  capture: replayed streams equal eager).

Sequence parallelism (`sp_group` of P ranks, every rank calls the same methods with the same inputs): each
rank runs the blocks on its band of every frame and caches keys/values of its H/P heads for all tokens
(`workers.sp`); the velocity is gathered on every rank after the head, so the sampler steps, and the
returned x0, are the same on all of them, and equal one rank's within float32 rounding (<= 1e-5 on CPU).
P must divide the heads and the tokens of a frame (checked when the engine is built).

The full-sequence references the streaming engine must reproduce (the correctness anchor) are here too:
`sparse_causal_mask`, `clean_context_mask`, `full_sequence_denoise` and `teacher_forced_denoise`.

The convkv-memory window (LiveAct's schedule, workers/LIVEACT.md; needs a model with ConvKV memory, ratio 5,
and no audio or the infinitetalk variant):
- chunks of 6 then 8 latent frames; per chunk one pass per denoising step on that step's cache, audio only
  from `stream.audio_from_step` on (before it the passes have no audio path at all: `audio_kv=None`);
  with `stream.audio_cfg` > 1 each audio step adds a null-audio pass (all-zero windows) on a cache of its
  own, v = v_null + cfg·(v − v_null). The sampler is the sparse-causal one (σ = t/1000 of
  `denoising_schedule`; x0 = x − σ·v, re-noised with the chunk's fresh noise), the network embedding the
  timesteps rounded to float32 as upstream holds them.
- the cache (`workers.kv_cache.MemoryKVCache`, preallocated at session open, written in place): per pass
  kind (3 steps, + 2 null-audio with CFG) and block 14 frame slots of pre-RoPE keys and values: chunk 0
  writes slots 0..5, later chunks 6..13; before each pass of chunk >= 2 its slot is updated once (slot 2 ←
  ConvKV(2..6), slot 3 ← ConvKV(7..11), slots 4..5 ← 12..13; `WanSelfAttention.compress_memory`, values
  with the key convolution as upstream).
- RoPE: one float32 table of the 14 slot positions per engine and device (`window_ropes`): queries at
  0..5 (chunk 0) or 6..13, the visible keys rotated at use by the table's first 6 or all 14 frames (the
  ConvKV needs pre-RoPE keys and the neighbours move from 12..13 to 4..5, as upstream rotates its cache
  every call). The time embeddings of both chunk sizes are built at session open, every block's keys/
  values of the null audio once per engine, the chunk's audio projected once per chunk.
- per pass: the blocks write the chunk's pre-RoPE keys/values into the slot and attend over the visible
  view, with one rotated copy of the visible keys as the only cache-sized temporary per block (the same
  rotation upstream runs; under `compile=True` inductor fuses it). The once-per-chunk memory update
  computes two L-token compressions per block before writing them (a convolution has no `out=`).
- `compile=True` works as for the sparse-causal window (one graph per chunk kind and audio/no-audio
  pass); compiled equals eager within 1e-5 (tests/workers/test_streaming_convkv.py).
- sequence parallelism as above: each rank holds its H/P heads of every token of the window, and the
  depthwise ConvKV compresses its heads with their channels of the weights (a memory token mixes 5
  consecutive tokens of one channel, all of which the head-sharded cache holds), so P ranks equal one
  within float32 rounding. This follows the single-GPU model's memory (generate.py), not upstream's own
  two-GPU variant (model_memory_sp.py), which fills the memory differently (workers/LIVEACT.md).
Equivalence: the engine equals `liveact_rollout` (tests/oracles/test_liveact_equivalence.py, LiveAct's
schedule written out uncached on `WanModel.forward`) within 1e-5 and reproduces upstream's own rollouts
(tests/fixtures/liveact) within 2e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.distributed as dist

from proto.model_config import InfiniteTalkAudioConfig
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning, InfiniteTalkAudio
from workers.batched import BatchItem, denoise_batch
from workers.cuda_graphs import StepGraphs, check_cuda_graphs, step_graphs_for
from workers.fp8 import KV_CACHE_DTYPES
from workers.kv_cache import CONVKV_RATIO, WINDOW_FRAMES, ChunkKVCache, MemoryKVCache
from workers.model import KV, Rope, WanModel
from workers.rope import grid_positions, rope_cos_sin, temporal_shift_cos_sin
from workers.sampler import denoising_schedule, predict_x0, renoise
from workers.sp import check_sp_shapes
from workers.ulysses import group_rank, group_size


@dataclass
class SessionState:
    """Per-stream state: cross-attention K/V (per block), the self-attention cache, the next chunk index,
    and the time embeddings (e `[1, F, dim]`, e0 `[1, F, 6, dim]`) of every pass of a chunk; for a first
    chunk of another size (the convkv-memory window) those of chunk 0's passes in `first_time_emb`."""

    cross_kv: list[dict[str, torch.Tensor]]
    cache: ChunkKVCache | MemoryKVCache
    next_chunk: int = 0
    time_emb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    first_time_emb: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of cached tensors held by the session (constant across chunks)."""
        cross = sum(t.numel() * t.element_size() for kv in self.cross_kv for t in kv.values())
        return cross + self.cache.nbytes


class StreamingDiT:
    """Runs a `WanModel` chunk by chunk in a fixed-size KV cache: sparse causal attention, or LiveAct's
    ConvKV-memory window (`StreamConfig.window`)."""

    def __init__(
        self,
        model: WanModel,
        stream: StreamConfig,
        sp_group: dist.ProcessGroup | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        kv_cache_dtype: str = "auto",
    ) -> None:
        cfg = model.config
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
            )
        # "auto": the cache in the model's dtype; "fp8": e4m3 with per-(token, head) scales (kv_cache.Fp8KV).
        self.kv_cache_dtype = kv_cache_dtype
        if stream.window == "convkv-memory":
            _check_convkv_model(model)
        elif cfg.memory is not None or cfg.audio_variant == "infinitetalk":
            raise ValueError(
                f"preset {cfg.name!r} is a SoulX-LiveAct-family model (infinitetalk audio, ConvKV memory), "
                "which streams with LiveAct's schedule (6 then 8 latent frames a chunk, sink + ConvKV "
                f"memory + neighbour cache), not the {stream.window!r} window; stream it with "
                f"StreamConfig.for_schedule({cfg.stream_schedule!r}, height=..., width=...)"
            )
        self.model = model
        self.stream = stream
        self.sp_group = sp_group
        self.sp_degree = group_size(sp_group)
        self._shift_work: dict[tuple, torch.Tensor] = {}  # kv_cache.shift_position's buffers, reused
        check_sp_shapes(model.config.num_heads, stream.tokens_per_frame, self.sp_degree, model.config.name)
        self.timesteps, self.sigmas = denoising_schedule(
            stream.denoising_steps, stream.timestep_shift, stream.warp_denoising_steps
        )
        # The timestep of every pass of a chunk: the denoising steps, then the clean-context refresh at 0.
        self.pass_timesteps = self.timesteps + ((0.0,) if stream.cache_mode == "clean-context" else ())
        if self.memory_window:
            # LiveAct's generate.py keeps its timesteps in a float32 tensor, so its network embeds
            # t = 833.3333129882812, not 833.333…; the sinusoidal embedding's fast frequencies see that
            # difference (~1e-5 on the latents at the tiny preset). The sampler's σ stays the schedule's.
            self.pass_timesteps = tuple(float(torch.tensor(t, dtype=torch.float32)) for t in self.timesteps)
        self.compiled = compile
        # torch.compile wraps the blocks without changing the model (references and training stay eager).
        self.blocks: list[torch.nn.Module] | None = (
            [torch.compile(block, dynamic=False) for block in model.blocks] if compile else None
        )
        self._rope_tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # convkv-memory window: the window's float32 RoPE table per device, and every block's keys/values of
        # the null audio (zero windows) per (starts_clip, device), both built once per engine.
        self._window_tables: dict[torch.device, Rope] = {}
        self._null_audio_kv: dict[tuple[bool, torch.device], list[KV]] = {}
        # --cuda-graphs: each pass replays a CUDA graph per static shape (workers.cuda_graphs)
        self.graphs: StepGraphs | None = None
        if cuda_graphs:
            check_cuda_graphs(next(model.parameters()).device, self.sp_degree)
            self.graphs = step_graphs_for(next(model.parameters()).device)

    @property
    def memory_window(self) -> bool:
        """Whether this engine streams LiveAct's ConvKV-memory window (`StreamConfig.window`)."""
        return self.stream.window == "convkv-memory"

    @property
    def audio_guided(self) -> bool:
        """Whether audio steps also run a null-audio pass (convkv window, `audio_cfg` > 1, audio layers)."""
        return self.memory_window and self.stream.audio_cfg > 1 and self.model.config.audio is not None

    @property
    def passes_per_chunk(self) -> int:
        """Forward passes per chunk: len(steps), plus the σ = 0 refresh in clean-context mode, plus one
        null-audio pass per audio step with audio CFG (convkv window)."""
        if self.memory_window:
            return len(self.timesteps) + (self._audio_steps if self.audio_guided else 0)
        return len(self.timesteps) + (1 if self.stream.cache_mode == "clean-context" else 0)

    @property
    def _audio_steps(self) -> int:
        return len(self.timesteps) - self.stream.audio_from_step

    def chunk_start(self, chunk_index: int) -> int:
        """First temporal position of chunk `chunk_index` (`position_mode`)."""
        f = self.stream.chunk_latent_frames
        if self.stream.position_mode == "absolute":
            return f * chunk_index
        return min(f * chunk_index, self.stream.train_latent_frames - f)

    def chunk_positions(self, chunk_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(temporal positions `[F]` of chunk `chunk_index`, positions `[k·F]` its attended context chunks
        take, c_0 then c_{t−1}, or None)."""
        f = self.stream.chunk_latent_frames
        start = self.chunk_start(chunk_index)
        current = torch.arange(start, start + f)
        if chunk_index == 0:
            return current, None
        first = torch.arange(f)
        if chunk_index == 1:
            return current, first
        return current, torch.cat([first, torch.arange(start - f, start)])

    def previous_shift(self, chunk_index: int) -> int:
        """Temporal positions to move c_{t−1}'s stored keys by at the start of chunk t (0 = none): it was
        rotated at its own start and is attended right before chunk t."""
        if chunk_index < 2:
            return 0
        f = self.stream.chunk_latent_frames
        return self.chunk_start(chunk_index) - f - self.chunk_start(chunk_index - 1)

    def _table(self, key: tuple[str, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin `[L, D/2]` (computed in float64, cast once): ("chunk", start) = the tokens of a
        chunk starting at `start`, ("shift", n) = a temporal rotation by n positions. Cached per engine in
        window mode (a bounded set of keys); built per call in absolute mode (positions grow endlessly)."""
        table = self._rope_tables.get(key)
        if table is not None and table[0].device == device:
            return table
        cfg, stream = self.model.config, self.stream
        kind, n = key
        if kind == "chunk":
            frames = torch.arange(n, n + stream.chunk_latent_frames, device=device)
            cos, sin = rope_cos_sin(cfg, grid_positions(frames, stream.token_height, stream.token_width))
        else:
            cos, sin = temporal_shift_cos_sin(cfg, n, stream.tokens_per_chunk, device=device)
        table = (cos.float(), sin.float())
        if stream.position_mode == "window":
            self._rope_tables[key] = table
        return table

    def open_session(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> SessionState:
        """Start a stream. context: umT5 features `[Lt, text_dim]`; clip_fea `[clip_tokens, clip_dim]`."""
        model = self.model
        cfg = model.config
        param = next(model.parameters())
        with torch.no_grad():
            cross_kv = model.cross_attention_kv(
                context[None].to(param.device), None if clip_fea is None else clip_fea[None].to(param.device)
            )
        if self.memory_window:
            return self._open_memory_session(cross_kv, param)
        slots = len(self.timesteps) if self.stream.cache_mode == "per-step" else 1
        with torch.no_grad():
            frames = self.stream.chunk_latent_frames
            time_emb = [
                model.time_embed(torch.full((1, frames), t, dtype=torch.float64, device=param.device))
                for t in self.pass_timesteps
            ]
        if self.stream.position_mode == "window":  # every chunk position's table, once per engine
            last = self.stream.train_latent_frames // self.stream.chunk_latent_frames + 1
            for start in sorted({self.chunk_start(i) for i in range(last + 1)}):
                self._table(("chunk", start), param.device)
        cache = ChunkKVCache(
            num_layers=cfg.num_layers,
            num_slots=slots,
            batch=1,
            tokens=self.stream.tokens_per_chunk,
            heads=cfg.num_heads // self.sp_degree,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
            kv_dtype=self.kv_cache_dtype,
        )
        return SessionState(cross_kv=cross_kv, cache=cache, time_emb=time_emb)

    def reset_session(self, state: SessionState) -> None:
        """Restart at chunk 0 with the same prompt and image (the cache is overwritten in place)."""
        state.next_chunk = 0

    def close_session(self, state: SessionState) -> None:
        """Release the session's tensors; the state cannot be used afterwards."""
        state.cross_kv = []
        state.time_emb = []
        state.first_time_emb = None
        state.cache.k = state.cache.v = torch.empty(0)
        state.next_chunk = -1
        if self.graphs is not None:  # its cache's addresses may now be reused
            self.graphs.drop(state)

    def chunk_inputs(
        self, chunk_index: int, audio: AudioConditioning | None, device: torch.device
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[KV] | None, torch.Tensor | None]:
        """What every pass of a chunk reuses: its float32 RoPE table, every block's audio keys/values (the
        audio projected once) and this rank's face mask."""
        rope = self._table(("chunk", self.chunk_start(chunk_index)), device)
        if audio is None:
            return rope, None, None
        tokens, face_mask = self.model.audio_inputs(audio, self.stream.chunk_latent_frames, self.sp_group)
        return rope, self.model.audio_kv(tokens), face_mask

    def step(
        self,
        state: SessionState,
        x: torch.Tensor,
        pass_index: int,
        chunk_index: int,
        y: torch.Tensor | None,
        chunk_inputs: tuple[tuple[torch.Tensor, torch.Tensor], list[KV] | None, torch.Tensor | None],
    ) -> torch.Tensor:
        """One pass over chunk `chunk_index` at `pass_timesteps[pass_index]`: the velocity `[16, F, h, w]`;
        the chunk's keys/values are written into the pass's cache slot."""
        rope, audio_kv, face_mask = chunk_inputs
        slot = pass_index if self.stream.cache_mode == "per-step" else 0
        time_emb = state.time_emb[pass_index]
        return self._forward(state, x, slot, chunk_index, y, rope, time_emb, audio_kv, face_mask=face_mask)

    def _forward(
        self,
        state: SessionState,
        x: torch.Tensor,
        slot: int,
        chunk_index: int,
        y: torch.Tensor | None,
        rope: Rope,
        time_emb: tuple[torch.Tensor, torch.Tensor],
        audio_kv: list[KV] | None,
        face_mask: torch.Tensor | None = None,
        mute: bool = False,
        key_rope: Rope | None = None,
    ) -> torch.Tensor:
        """`WanModel.forward_step` of chunk `chunk_index` on the session's cache slot `slot`: the velocity
        `[16, F, h, w]` (either window; `key_rope` only for the pre-RoPE `MemoryKVCache`)."""
        cache = state.cache
        k, v = cache.slot_views(slot)
        e, e0 = time_emb
        at, visible = cache.write_offset(chunk_index), cache.visible(chunk_index)

        def run(
            x: torch.Tensor,
            y: torch.Tensor | None,
            rope: Rope,
            audio_kv: list[KV] | None,
            face_mask: torch.Tensor | None,
            key_rope: Rope | None,
        ) -> torch.Tensor:
            return self.model.forward_step(
                x[None],
                e,
                e0,
                rope,
                k,
                v,
                at,
                visible,
                state.cross_kv,
                y=None if y is None else y[None],
                audio_kv=audio_kv,
                face_mask=face_mask,
                sp_group=self.sp_group,
                blocks=self.blocks,
                mute_first_frame=mute,
                key_rope=key_rope,
            )[0]

        inputs = (x, y, rope, audio_kv, face_mask, key_rope)
        if self.graphs is None:
            return run(*inputs)
        # The cache slot, cross-attention K/V and time embeddings are read/written where they are.
        by_reference = [k, v, e, e0, *(t for kv in state.cross_kv for t in kv.values())]
        return self.graphs.run(run, inputs, by_reference=by_reference, key=(at, visible, mute), owner=state)

    @torch.no_grad()
    def denoise_chunk(
        self,
        state: SessionState,
        chunk_index: int,
        *,
        y: torch.Tensor | None = None,
        audio: AudioConditioning | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Denoise chunk `chunk_index` (must be the session's next chunk) and return its x0 `[16, F, h, w]`.

        F is the chunk's own latent frame count, `stream.frames_in_chunk(chunk_index)` (LiveAct: 6, then 8).
        y: I2V conditioning of this chunk `[20, F, h, w]` (i2v models).
        audio: the chunk's audio inputs with batch 1, or None: talkingmachines `AudioConditioning` (features
            `[1, C, F + window − 1, ...]`, speaking `[1, C, F]`, face_mask `[1, C, F·h·w]`); infinitetalk
            `InfiniteTalkAudio` (windows `[1, T, audio_window, layers, dim]` of the chunk's T =
            `stream.video_frames_in_chunk(chunk_index)` video frames, starts_clip exactly for chunk 0).
        noise: `[S, 16, F, h, w]`: noise[0] is the initial x_T, noise[s] the fresh ε that re-noises to step s;
            drawn from `generator` when None.
        steps: the indices of the denoising steps to run (a degraded chunk, `engine.degrade`; checked by
            `check_step_indices`); () runs them all. The noise keeps the full schedule's layout.
        """
        run = self.check_step_indices(steps)
        if chunk_index != state.next_chunk:
            raise ValueError(
                f"chunk {chunk_index} requested but the session expects chunk {state.next_chunk}; chunks are "
                "causal and must be denoised in order (reset_session to restart)"
            )
        param = next(self.model.parameters())
        shape = (len(self.timesteps), *self.stream.latent_shape(chunk_index))
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(param.device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [steps, 16, F, h, w] = {shape}")
        noise = noise.to(param.device)
        if y is not None:
            y = y.to(param.device)
        if self.memory_window:
            x0 = self._denoise_memory_chunk(state, chunk_index, y, audio, noise)
            state.next_chunk += 1
            return x0
        shift = self.previous_shift(chunk_index)
        if shift:  # the window stopped moving: c_{t−1} moves back, once per chunk, in place
            cos, sin = self._table(("shift", shift), param.device)
            state.cache.shift_position(state.cache.position(chunk_index - 1), cos, sin, self._shift_work)
        inputs = self.chunk_inputs(chunk_index, audio, param.device)
        x = noise[0]
        x0 = x
        for j, s in enumerate(run):  # every step, or a degraded chunk's subset (re-noised to the next kept σ)
            v = self.step(state, x, s, chunk_index, y, inputs)
            x0 = predict_x0(x, v.to(x.dtype), self.sigmas[s])
            if j + 1 < len(run):
                x = renoise(x0, self.sigmas[run[j + 1]], noise[run[j + 1]])
        if self.stream.cache_mode == "clean-context":  # the σ = 0 refresh writes the chunk's clean keys
            self.step(state, x0, len(self.sigmas), chunk_index, y, inputs)
        elif len(run) < len(self.sigmas):
            self.fill_skipped_slots(state, chunk_index, run)
        state.next_chunk += 1
        return x0

    # ---- degraded chunks (engine.degrade) ------------------------------------------------------------------

    def check_step_indices(self, steps: tuple[int, ...]) -> tuple[int, ...]:
        """The step indices a chunk runs: () → all of them; else `steps`, which must increase strictly from 0
        within the schedule (step 0 starts from pure noise, noise[0]), on the sparse-causal window. Raises
        ValueError naming the fix."""
        count = len(self.sigmas)
        if not steps:
            return tuple(range(count))
        steps = tuple(int(s) for s in steps)
        if steps[0] != 0 or any(b <= a for a, b in pairwise(steps)) or steps[-1] >= count:
            raise ValueError(
                f"step_indices {steps} must increase strictly from 0 and stay below the schedule's {count} "
                "steps (engine.degrade.reduced_step_indices)"
            )
        if self.memory_window and len(steps) < count:
            raise ValueError(
                "the convkv-memory window cannot skip denoising steps (its per-step ConvKV memory has no "
                "fill rule); run the full schedule (step_indices ())"
            )
        return steps

    def fill_skipped_slots(self, state: SessionState, chunk_index: int, run: tuple[int, ...]) -> None:
        """`per-step` cache after a degraded chunk: each skipped step's slot gets this chunk's keys/values of
        the executed pass whose σ is nearest (ties: the smaller σ), every block, in place.

        Why: the next chunk's pass s attends to this chunk's keys in slot s; left alone, the slot would hold
        the keys of the chunk two back (the ring position's previous occupant), at the wrong place in time.
        Copying the nearest executed pass's keys keeps the slot this chunk's, at the noise level closest to
        the one pass s expects; the alternative, an extra pass per skipped slot to compute its exact keys,
        would cost what the degradation saves. The trade-off: the next chunk's pass s sees its predecessor
        at a noise level off by |σ_s − σ_nearest| (for (1000, 500) → (1000): the σ = 1 keys of pure noise
        stand in for the σ(500) keys, so the next chunk's second pass sees a noisier previous chunk, which
        loosens its continuity with it for one chunk; c_0, the sink, is never degraded by the engine)."""
        cache = state.cache
        assert isinstance(cache, ChunkKVCache)
        start = cache.write_offset(chunk_index)
        span = slice(start, start + cache.tokens)
        for s in range(len(self.sigmas)):
            if s in run:
                continue
            source = min(run, key=lambda e: (abs(self.sigmas[e] - self.sigmas[s]), self.sigmas[e]))
            cache.k[:, s, :, span].copy_(cache.k[:, source, :, span])
            cache.v[:, s, :, span].copy_(cache.v[:, source, :, span])
    def denoise_batch(self, items: Sequence[BatchItem]) -> list[torch.Tensor]:
        """Chunks of several sessions, compatible ones in one forward per pass (`workers.batched`): each
        item's x0 `[16, F, h, w]`, equal to its `denoise_chunk` within float32 rounding."""
        return denoise_batch(self, items)

    # ---- the convkv-memory window (SoulX-LiveAct) ---------------------------------------------------------

    def _open_memory_session(
        self, cross_kv: list[dict[str, torch.Tensor]], param: torch.Tensor
    ) -> SessionState:
        """The session of the convkv-memory window: time embeddings of every step at chunk 0's and the later
        chunks' frame counts, the window's RoPE table (once per engine), the preallocated `MemoryKVCache`."""
        cfg, stream = self.model.config, self.stream

        def full(shape: tuple[int, int], t: float) -> torch.Tensor:
            return torch.full(shape, t, dtype=torch.float64, device=param.device)

        def embeddings(frames: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            with torch.no_grad():
                return [self.model.time_embed(full((1, frames), t)) for t in self.pass_timesteps]

        self._window_rope(param.device)
        cache = MemoryKVCache(
            num_layers=cfg.num_layers,
            num_slots=self.passes_per_chunk,
            batch=1,
            tokens_per_frame=stream.tokens_per_frame,
            heads=cfg.num_heads // self.sp_degree,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
            kv_dtype=self.kv_cache_dtype,
        )
        return SessionState(
            cross_kv=cross_kv,
            cache=cache,
            time_emb=embeddings(stream.chunk_latent_frames),
            first_time_emb=embeddings(stream.frames_in_chunk(0)),
        )

    def _window_rope(self, device: torch.device) -> Rope:
        """float32 cos/sin `[14·L, D/2]` of the whole window: frame slot f at temporal position f, (h, w) by
        the token's index in its slot. Computed in float64 and cast once per engine and device."""
        table = self._window_tables.get(device)
        if table is None:
            stream = self.stream
            frames = torch.arange(WINDOW_FRAMES, device=device)
            positions = grid_positions(frames, stream.token_height, stream.token_width)
            cos, sin = rope_cos_sin(self.model.config, positions)
            table = self._window_tables[device] = (cos.float(), sin.float())
        return table

    def window_ropes(self, chunk_index: int, device: torch.device) -> tuple[Rope, Rope]:
        """(the queries' table, the visible keys' table) of chunk `chunk_index`, views of the window table:
        chunk 0 at frame positions 0..5 over keys 0..5; later chunks at 6..13 over keys 0..13."""
        cos, sin = self._window_rope(device)
        context = self.stream.tokens_in_chunk(0)
        if chunk_index == 0:
            first = (cos[:context], sin[:context])
            return first, first
        return (cos[context:], sin[context:]), (cos, sin)

    def null_slot(self, step: int) -> int:
        """The cache slot of the null-audio pass at audio step `step` (audio CFG): after the steps' slots."""
        return len(self.timesteps) + step - self.stream.audio_from_step

    def _null_audio_kv_of(self, starts_clip: bool, device: torch.device) -> list[KV]:
        """Every block's audio keys/values of all-zero windows (audio CFG's null audio; the projection of
        zeros is not zero), for chunk 0 (`starts_clip`) or a later chunk, built once per engine."""
        key = (starts_clip, device)
        kv = self._null_audio_kv.get(key)
        if kv is None:
            audio = self.model.config.audio
            assert isinstance(audio, InfiniteTalkAudioConfig)
            index = 0 if starts_clip else 1
            shape = (1, self.stream.video_frames_in_chunk(index), audio.audio_window, audio.wav2vec_layers)
            windows = torch.zeros((*shape, audio.wav2vec_dim), device=device)
            null = InfiniteTalkAudio(windows=windows, starts_clip=starts_clip)
            tokens, _ = self.model.audio_inputs(null, self.stream.frames_in_chunk(index))
            kv = self._null_audio_kv[key] = self.model.audio_kv(tokens)
        return kv

    def _compress(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Block `layer`'s ConvKV of this rank's heads (a head shard uses its channels of the weights)."""
        first_head = group_rank(self.sp_group) * k.shape[2]
        return self.model.blocks[layer].self_attn.compress_memory(k, v, first_head=first_head)

    def _denoise_memory_chunk(
        self,
        state: SessionState,
        chunk_index: int,
        y: torch.Tensor | None,
        audio: AudioConditioning | InfiniteTalkAudio | None,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """LiveAct's chunk: per step s a pass on cache slot s, with the audio only from `audio_from_step`
        on (before it no audio path at all); with audio CFG a null-audio pass on its own slot at the audio
        steps, v = v_null + cfg·(v − v_null); then the sampler's x0 and re-noising."""
        model, stream = self.model, self.stream
        first = chunk_index == 0
        rope_q, rope_k = self.window_ropes(chunk_index, noise.device)
        time_emb = state.first_time_emb if first else state.time_emb
        assert time_emb is not None
        audio_kv = null_kv = None
        mute = False
        if audio is not None:
            if isinstance(audio, InfiniteTalkAudio) and audio.starts_clip != first:
                raise ValueError(
                    f"chunk {chunk_index}'s audio has starts_clip={audio.starts_clip}; in the convkv-memory "
                    "window exactly chunk 0 starts the clip (its reference frame)"
                )
            tokens, _ = model.audio_inputs(audio, stream.frames_in_chunk(chunk_index), self.sp_group)
            audio_kv = model.audio_kv(tokens)
            mute = model.mutes_first_frame(audio)
            if self.audio_guided:
                null_kv = self._null_audio_kv_of(first, noise.device)
        elif self.audio_guided:
            raise ValueError(
                f"audio_cfg={stream.audio_cfg} guides every chunk's audio steps with a null-audio pass on "
                f"caches of its own; chunk {chunk_index} came without audio"
            )
        cache = state.cache
        assert isinstance(cache, MemoryKVCache)

        def forward(x: torch.Tensor, step: int, slot: int, kv: list[KV] | None) -> torch.Tensor:
            """A pass on cache `slot`: from chunk 2 on the slot's memory update first, then every block
            writes the chunk's pre-RoPE keys/values in place and attends over the window, rotated at use."""
            if chunk_index >= 2:
                cache.update_memory(slot, self._compress)
            muted = mute and kv is not None
            emb = time_emb[step]
            return self._forward(state, x, slot, chunk_index, y, rope_q, emb, kv, mute=muted, key_rope=rope_k)

        x = noise[0]
        x0 = x
        for s, sigma in enumerate(self.sigmas):
            audible = audio_kv is not None and s >= stream.audio_from_step
            v = forward(x, s, s, audio_kv if audible else None)
            if audible and null_kv is not None:
                v_null = forward(x, s, self.null_slot(s), null_kv)
                v = v_null + stream.audio_cfg * (v - v_null)
            x0 = predict_x0(x, v.to(x.dtype), sigma)
            if s + 1 < len(self.sigmas):
                x = renoise(x0, self.sigmas[s + 1], noise[s + 1])
        return x0


def _check_convkv_model(model: WanModel) -> None:
    """The convkv-memory window needs the model's ConvKV memory at ratio 5 (5 frames per memory frame), and
    no audio or the infinitetalk variant."""
    cfg = model.config
    if cfg.memory is None or cfg.memory.ratio != CONVKV_RATIO:
        raise ValueError(
            f"the 'convkv-memory' window compresses {CONVKV_RATIO} frames into each memory frame with the "
            f"model's ConvKV memory (ratio {CONVKV_RATIO}); preset {cfg.name!r} has memory={cfg.memory}"
        )
    if cfg.audio is not None and not isinstance(cfg.audio, InfiniteTalkAudioConfig):
        raise ValueError(
            f"the 'convkv-memory' window streams the infinitetalk audio variant (or none); preset "
            f"{cfg.name!r} has the {cfg.audio_variant} variant"
        )


def sparse_causal_mask(
    num_chunks: int, chunk_tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean `[N·L, N·L]` (True = may attend): chunk i's queries see chunk 0, chunk i − 1 and chunk i."""
    q = torch.arange(num_chunks, device=device)[:, None]
    k = torch.arange(num_chunks, device=device)[None, :]
    chunk_mask = (k == 0) | (k == q - 1) | (k == q)
    return chunk_mask.repeat_interleave(chunk_tokens, 0).repeat_interleave(chunk_tokens, 1)


def clean_context_mask(
    num_chunks: int, chunk_tokens: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Teacher-forcing mask `[2·N·L, 2·N·L]` over [clean chunks ; noisy chunks].

    Clean chunk i sees clean chunks 0, i − 1, i (sparse causal); noisy chunk i sees clean chunks 0 and i − 1
    (for i ≥ 1) and itself — what a clean-context stream's denoising passes see.
    """
    sparse = sparse_causal_mask(num_chunks, chunk_tokens, device)
    q = torch.arange(num_chunks, device=device)[:, None]
    k = torch.arange(num_chunks, device=device)[None, :]
    noisy_to_clean = ((k == 0) | (k == q - 1)) & (q > 0)
    noisy_to_clean = noisy_to_clean.repeat_interleave(chunk_tokens, 0).repeat_interleave(chunk_tokens, 1)
    eye = torch.eye(num_chunks, dtype=torch.bool, device=device)
    noisy_to_noisy = eye.repeat_interleave(chunk_tokens, 0).repeat_interleave(chunk_tokens, 1)
    top = torch.cat([sparse, torch.zeros_like(sparse)], dim=1)
    bottom = torch.cat([noisy_to_clean, noisy_to_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


@torch.no_grad()
def full_sequence_denoise(
    model: WanModel,
    stream: StreamConfig,
    noise: torch.Tensor,
    cross_kv: list[dict[str, torch.Tensor]],
    y: torch.Tensor | None = None,
    audio: AudioConditioning | None = None,
) -> torch.Tensor:
    """Reference for `per-step` streaming: the few-step sampler over N whole chunks at once, every step one
    forward with the sparse block mask and the shared timestep, absolute positions.

    noise `[S, 16, N·F, h, w]` (noise[s] for all chunks, chunk-major), y `[20, N·F, h, w]`, audio with batch 1
    over N·F frames. Returns x0 `[16, N·F, h, w]`.
    """
    timesteps, sigmas = denoising_schedule(
        stream.denoising_steps, stream.timestep_shift, stream.warp_denoising_steps
    )
    frames = noise.shape[2]
    mask = sparse_causal_mask(frames // stream.chunk_latent_frames, stream.tokens_per_chunk, noise.device)
    x = noise[0]
    x0 = x
    for s, (t, sigma) in enumerate(zip(timesteps, sigmas, strict=True)):
        v = model(
            x[None],
            torch.tensor([t], dtype=torch.float64, device=x.device),
            cross_kv=cross_kv,
            y=None if y is None else y[None],
            audio=audio,
            attn_mask=mask,
        )[0]
        x0 = predict_x0(x, v.to(x.dtype), sigma)
        if s + 1 < len(timesteps):
            x = renoise(x0, sigmas[s + 1], noise[s + 1])
    return x0


@torch.no_grad()
def teacher_forced_denoise(
    model: WanModel,
    stream: StreamConfig,
    noise: torch.Tensor,
    clean: torch.Tensor,
    cross_kv: list[dict[str, torch.Tensor]],
    y: torch.Tensor | None = None,
    audio: AudioConditioning | None = None,
) -> torch.Tensor:
    """Reference for `clean-context` streaming: the sampler over [clean ; noisy] with `clean_context_mask`.

    clean `[16, N·F, h, w]` are the context chunks' x0 at t = 0 (e.g. a stream's outputs); noise as in
    `full_sequence_denoise`. Both halves take the chunks' absolute positions. Returns the noisy half's x0.
    """
    timesteps, sigmas = denoising_schedule(
        stream.denoising_steps, stream.timestep_shift, stream.warp_denoising_steps
    )
    frames = noise.shape[2]
    mask = clean_context_mask(frames // stream.chunk_latent_frames, stream.tokens_per_chunk, noise.device)
    positions = torch.arange(frames, device=noise.device).repeat(2)
    y2 = None if y is None else torch.cat([y, y], dim=1)[None]
    audio2 = None if audio is None else _duplicate_audio(model, audio)
    x = noise[0]
    x0 = x
    for s, (t, sigma) in enumerate(zip(timesteps, sigmas, strict=True)):
        per_frame_t = torch.cat(
            [torch.zeros(frames, dtype=torch.float64), torch.full((frames,), t, dtype=torch.float64)]
        ).to(x.device)
        v = model(
            torch.cat([clean, x], dim=1)[None],
            per_frame_t[None],
            cross_kv=cross_kv,
            y=y2,
            audio=audio2,
            frame_positions=positions,
            attn_mask=mask,
        )[0]
        x0 = predict_x0(x, v[:, frames:].to(x.dtype), sigma)
        if s + 1 < len(timesteps):
            x = renoise(x0, sigmas[s + 1], noise[s + 1])
    return x0


def _duplicate_audio(model: WanModel, audio: AudioConditioning) -> AudioConditioning:
    """Audio for [clean ; noisy]: both halves get the same per-frame tokens and face masks."""
    tokens = audio.tokens
    if tokens is None:
        tokens = model.audio_proj(audio.features, audio.speaking)
    face_mask = None if audio.face_mask is None else torch.cat([audio.face_mask, audio.face_mask], dim=-1)
    return AudioConditioning(tokens=torch.cat([tokens, tokens], dim=2), face_mask=face_mask)

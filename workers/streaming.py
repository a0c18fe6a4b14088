"""Sparse-causal streaming of the DiT: chunk t attends to c_0, c_{t−1} and itself, endlessly, in fixed memory.

API (one engine per model, one `SessionState` per stream):

    engine = StreamingDiT(model, stream_cfg)
    state = engine.open_session(context, clip_fea)          # text/image cross-attention K/V, computed once
    x0 = engine.denoise_chunk(state, 0, y=y_chunk, audio=audio_chunk, noise=noise)   # [16, F, h, w]
    x0 = engine.denoise_chunk(state, 1, ...)                 # chunks must come in order
    engine.close_session(state)                              # frees the caches

Cache modes (StreamConfig.cache_mode):
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

Sequence parallelism (`sp_group` of P ranks, every rank calls the same methods with the same inputs): each
rank runs the blocks on its band of every frame and caches keys/values of its H/P heads for all tokens
(`workers.sp`); the velocity is gathered on every rank after the head, so the sampler steps, and the
returned x0, are the same on all of them, and equal one rank's within float32 rounding (<= 1e-5 on CPU).
P must divide the heads and the tokens of a frame (checked when the engine is built).

The full-sequence references the streaming engine must reproduce (the correctness anchor) are here too:
`sparse_causal_mask`, `clean_context_mask`, `full_sequence_denoise` and `teacher_forced_denoise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning
from workers.kv_cache import ChunkKVCache
from workers.model import KV, WanModel
from workers.rope import grid_positions, rope_cos_sin, temporal_shift_cos_sin
from workers.sampler import denoising_schedule, predict_x0, renoise
from workers.sp import check_sp_shapes
from workers.ulysses import group_size


@dataclass
class SessionState:
    """Per-stream state: cross-attention K/V (per block), the self-attention cache, the next chunk index,
    and the time embeddings (e `[1, F, dim]`, e0 `[1, F, 6, dim]`) of every pass of a chunk."""

    cross_kv: list[dict[str, torch.Tensor]]
    cache: ChunkKVCache
    next_chunk: int = 0
    time_emb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of cached tensors held by the session (constant across chunks)."""
        cross = sum(t.numel() * t.element_size() for kv in self.cross_kv for t in kv.values())
        return cross + self.cache.nbytes


class StreamingDiT:
    """Runs a `WanModel` chunk by chunk with sparse causal attention and a fixed-size KV cache."""

    def __init__(
        self,
        model: WanModel,
        stream: StreamConfig,
        sp_group: dist.ProcessGroup | None = None,
        compile: bool = False,
    ) -> None:
        cfg = model.config
        if cfg.memory is not None or cfg.audio_variant == "infinitetalk":
            raise ValueError(
                f"preset {cfg.name!r} is a SoulX-LiveAct-family model (infinitetalk audio, ConvKV memory), "
                "which streams with LiveAct's schedule (6 then 8 latent frames a chunk, sink + ConvKV "
                "memory + neighbour cache); this engine runs the TalkingMachines schedule only, LiveAct's "
                "is not implemented yet"
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
        self.compiled = compile
        # torch.compile wraps the blocks without changing the model (references and training stay eager).
        self.blocks: list[torch.nn.Module] | None = (
            [torch.compile(block, dynamic=False) for block in model.blocks] if compile else None
        )
        self._rope_tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def passes_per_chunk(self) -> int:
        """Forward passes per chunk: len(steps), plus the σ = 0 refresh in clean-context mode."""
        return len(self.timesteps) + (1 if self.stream.cache_mode == "clean-context" else 0)

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
        )
        return SessionState(cross_kv=cross_kv, cache=cache, time_emb=time_emb)

    def reset_session(self, state: SessionState) -> None:
        """Restart at chunk 0 with the same prompt and image (the cache is overwritten in place)."""
        state.next_chunk = 0

    def close_session(self, state: SessionState) -> None:
        """Release the session's tensors; the state cannot be used afterwards."""
        state.cross_kv = []
        state.time_emb = []
        state.cache.k = state.cache.v = torch.empty(0)
        state.next_chunk = -1

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
        cache = state.cache
        slot = pass_index if self.stream.cache_mode == "per-step" else 0
        k, v = cache.slot_views(slot)
        e, e0 = state.time_emb[pass_index]
        return self.model.forward_step(
            x[None],
            e,
            e0,
            rope,
            k,
            v,
            cache.write_offset(chunk_index),
            cache.visible(chunk_index),
            state.cross_kv,
            y=None if y is None else y[None],
            audio_kv=audio_kv,
            face_mask=face_mask,
            sp_group=self.sp_group,
            blocks=self.blocks,
        )[0]

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
    ) -> torch.Tensor:
        """Denoise chunk `chunk_index` (must be the session's next chunk) and return its x0 `[16, F, h, w]`.

        y: I2V conditioning of this chunk `[20, F, h, w]` (i2v models).
        audio: the chunk's audio inputs with batch 1 (features `[1, C, F + window − 1, ...]`, speaking
            `[1, C, F]`, face_mask `[1, C, F·h·w]`), or None.
        noise: `[S, 16, F, h, w]`: noise[0] is the initial x_T, noise[s] the fresh ε that re-noises to step s;
            drawn from `generator` when None.
        """
        if chunk_index != state.next_chunk:
            raise ValueError(
                f"chunk {chunk_index} requested but the session expects chunk {state.next_chunk}; chunks are "
                "causal and must be denoised in order (reset_session to restart)"
            )
        param = next(self.model.parameters())
        shape = (len(self.timesteps), *self.stream.latent_chunk_shape)
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(param.device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected [steps, 16, F, h, w] = {shape}")
        noise = noise.to(param.device)
        if y is not None:
            y = y.to(param.device)
        shift = self.previous_shift(chunk_index)
        if shift:  # the window stopped moving: c_{t−1} moves back, once per chunk, in place
            cos, sin = self._table(("shift", shift), param.device)
            state.cache.shift_position(state.cache.position(chunk_index - 1), cos, sin, self._shift_work)
        inputs = self.chunk_inputs(chunk_index, audio, param.device)
        x = noise[0]
        x0 = x
        for s, sigma in enumerate(self.sigmas):
            v = self.step(state, x, s, chunk_index, y, inputs)
            x0 = predict_x0(x, v.to(x.dtype), sigma)
            if s + 1 < len(self.sigmas):
                x = renoise(x0, self.sigmas[s + 1], noise[s + 1])
        if self.stream.cache_mode == "clean-context":  # the σ = 0 refresh writes the chunk's clean keys
            self.step(state, x0, len(self.sigmas), chunk_index, y, inputs)
        state.next_chunk += 1
        return x0


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

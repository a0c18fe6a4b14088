"""The memory plan checked at start-up: what every rank of a serving group will hold, against its device.

``plan_memory`` is pure (configuration in, bytes out; no weights are loaded and nothing is allocated on a
device: parameter counts come from models built on the meta device, the VAE's numbers from a meta-device
decode step). Per rank of the topology (``proto.topology``: N score workers = the SP degree; rank 0 is the
master, which also denoises when the decoder is colocated):

- **DiT weights** (every score worker holds all of them, Ulysses splits heads, not weights): parameters ×
  the run's dtype (``default_dtype``: bfloat16 on CUDA, float32 on CPU, unless the caller passes one).
- **KV cache per session** (``workers.kv_cache.ChunkKVCache`` + ``workers.streaming.SessionState``): the
  self-attention cache ``layers × caches × window tokens × H/N × head_dim × 2 (K, V) × bytes``: caches =
  denoising steps in ``per-step`` mode, 1 in ``clean-context``, plus one per audio step with audio CFG
  (LiveAct's null-audio caches), 1 on a step-pipeline stage rank (its own step's); window tokens = 3 chunks
  (c_0, c_t−1, c_t: one preallocated view attention reads) × L_chunk for the paper's window, LiveAct's 14
  latent frames × L_frame for the ConvKV window (each SP rank keeps its H/N heads), plus the text (+ CLIP)
  cross-attention K/V, which every rank keeps for all heads:
  ``layers × L_ctx × dim × 2 × bytes``. Exact: tests/workers/test_memory_plan.py compares it with the
  tensors a tiny session allocates. × sessions (1 for ``run``, ``max_sessions`` for ``serve``).
- **DiT activations** of one forward of a steady-state chunk (t ≥ 2; the largest chunk: LiveAct's 8 latent
  frames, attending to its whole 14-frame window, rotated afresh each call), an *estimate*
  (``dit_activation_bytes`` states the formula): the tensors held across the whole pass (every block's audio
  keys/values, projected once per chunk; the chunk's keys/values go straight into the cache) plus the largest
  per-block working set (q/k/v and their Ulysses copies, the rotated q and k and the float32 rotation's
  temporaries, or the FFN's hidden layer). It assumes a fused attention kernel (flash / memory-efficient SDPA,
  as on CUDA and CPU without a mask): the ``math`` backend's [H, Lq, Lkv] score matrix is not counted. A
  meta-device trace of one forward (``trace_peak_bytes``) agrees with it within the tolerance the tests state.
- **FP8** (``--fp8 linear``, ``--kv-cache-dtype fp8``; ``workers.fp8``): the converted linear layers' weights
  at 1 byte an element plus float32 row scales (``dit_weight_bytes``), the self-attention cache at head_dim
  bytes plus one float32 scale per (token, head) instead of head_dim × the dtype's bytes (``kv_cache_bytes``).
- **Master**: VAE weights (float32, as the master builds it), the conditioning encoders (umT5, CLIP, wav2vec2:
  the tiny random ones' parameters, or the size of a checkpoint folder's weight files, which is what
  ``from_pretrained`` loads with its default dtype), the VAE **decode cache per session** (the causal
  feature cache, float32, constant over the stream) plus the session's I2V conditioning ``y``, and the VAE's
  activation peak for one decode or encode step (measured by tracing the live tensor bytes of a meta-device
  step, which follows eager execution but not the CUDA allocator's rounding). A colocated rank 0 scores and
  decodes in turn (no overlap), so it counts the larger of the two activation peaks, not their sum.
- **Margin**: ``MARGIN_FRACTION`` (10%) of the above for allocator fragmentation, plus a fixed
  ``CUDA_FIXED_MARGIN`` (1 GiB: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers) per GPU, or
  ``CPU_FIXED_MARGIN`` (0.5 GiB: Python, torch and its libraries) per process on a CPU.

The budget: on CUDA every rank has its own GPU, and each rank's total is compared with that GPU's free
memory; on CPU all ranks share the host, and the sum is compared with its available memory (MemAvailable).
``--device-memory GIB`` replaces the measured figure (per GPU; the host's on CPU). When a configuration does
not fit, ``refusal_message`` lists the parts and the alternatives the same planner finds to fit: more SP
ranks, fewer sessions, a lower resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from proto.model_config import InfiniteTalkAudioConfig, ModelConfig
from proto.stream_config import StreamConfig
from proto.topology import Topology
from proto.vae_config import vae_preset_for

GIB = 2**30
MARGIN_FRACTION = 0.10
CUDA_FIXED_MARGIN = 1 * GIB
CPU_FIXED_MARGIN = GIB // 2
VAE_DTYPE = torch.float32  # the master builds the VAE in float32 and decodes without autocast
ROPE_BYTES = 4  # the streaming engine's RoPE tables are float32 (workers.rope.rotate computes in their dtype)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_dtype(device: str) -> torch.dtype:
    """The DiT's dtype when no option sets it: bfloat16 on CUDA, float32 on CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gib(n: float) -> str:
    """Bytes as GiB, with more decimals for small figures (the tiny preset's are megabytes)."""
    value = n / GIB
    return f"{value:.2f} GiB" if value >= 0.1 else f"{value:.4f} GiB"


# ---- exact sizes -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def dit_parameters(config: ModelConfig) -> int:
    """Parameter elements of the DiT of ``config`` (built on the meta device)."""
    from workers.model import WanModel

    with torch.device("meta"):
        model = WanModel(config)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@functools.lru_cache(maxsize=16)
def dit_weight_bytes(config: ModelConfig, dtype: torch.dtype, fp8_linear: bool = False) -> int:
    """Bytes of the DiT's weights in ``dtype``; with ``fp8_linear`` those ``workers.fp8.convert_to_fp8``
    converts at 1 byte an element plus float32 row scales (``workers.fp8.fp8_weight_bytes``)."""
    if not fp8_linear:
        return dit_parameters(config) * _bytes(dtype)
    from workers.fp8 import fp8_weight_bytes
    from workers.model import WanModel

    with torch.device("meta"):
        model = WanModel(config)
    return fp8_weight_bytes(model, dtype)


def kv_cache_bytes(
    config: ModelConfig,
    stream: StreamConfig,
    sp_degree: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
) -> dict[str, int]:
    """One session's cache on one score worker: ``self_attn`` (its H/N heads), ``cross_attn`` (all).

    ``self_attn = layers × caches × window tokens × (H/N)·head_dim × 2 (K, V) × bytes``
    (``StreamConfig.num_kv_caches``, ``StreamConfig.kv_cache_tokens``). LiveAct at 512x512 in bf16 on one
    rank: 40 × 3 × 14·1024 × 5120 × 2 × 2 B = 3 × 11.7 GB (3 × 10.9 GiB), as upstream's ``kv_cache`` (5
    caches with ``audio_cfg`` > 1). ``kv_cache_dtype="fp8"``: head_dim e4m3 bytes plus a float32 scale per
    (token, head) (``workers.kv_cache.Fp8KV``) instead of head_dim × bytes; the cross-attention keeps
    ``dtype``."""
    b = _bytes(dtype)
    heads = config.num_heads // sp_degree
    tokens = stream.kv_cache_tokens
    per_head = config.head_dim + 4 if kv_cache_dtype == "fp8" else config.head_dim * b
    self_attn = config.num_layers * stream.num_kv_caches * tokens * heads * per_head * 2
    context = config.text_len + (config.clip_tokens if config.has_image_branch else 0)
    cross = config.num_layers * context * config.dim * 2 * b
    return {"self_attn": self_attn, "cross_attn": cross}


def dit_activation_bytes(
    config: ModelConfig, stream: StreamConfig, sp_degree: int, dtype: torch.dtype
) -> int:
    """Estimated peak of one DiT forward over a steady-state chunk on one of N = ``sp_degree`` ranks.

    With b = bytes per element, n layers, L = tokens per chunk, F frames, L/N local tokens and
    E = (H/N)·head_dim = dim/N channels of this rank's heads:

    - held for the whole pass: every block's audio keys/values (projected once per chunk),
      ``n · 2 · C · F · N_audio · dim · b``; the chunk's keys/values are written into the preallocated cache
      block by block and attention reads a view of it (no concatenated prefix, nothing collected);
    - the largest block working set, the self-attention's:
      q, k, v ``3 · L · E · b`` (twice with N > 1: the tokens' shard and the gathered heads), one rotated
      tensor ``L · E · b`` (k is rotated and written into the cache before q is rotated) and the float32
      rotation's temporaries (products and stacked result ``2 · L · E · 4``, plus the float32 copy of the
      input when b < 4); or the FFN's ``2 · (L/N) · ffn · b`` if larger;
    - float32 norm/modulation temporaries of the residual stream, ``3 · (L/N) · dim · 4``, and the gathered
      float32 head output ``2 · L · patch_out · 4``.

    LiveAct's window (``convkv-memory``, the largest chunk: 8 frames): the audio held is the projected tokens
    and every block's keys/values of them (``F · context_tokens`` tokens); the chunk's keys/values go into the
    pre-RoPE cache as they are, so the working set is q and its rotation ``2 · L · E · b`` (twice with N > 1)
    plus the rotation of the window's visible keys at use, ``3 · 14·L_frame · E · 4`` (2 when b = 4), which
    ends with the rotated keys.

    An estimate: exact shapes, but it counts only these tensors and assumes a fused attention kernel.
    """
    b = _bytes(dtype)
    n = config.num_layers
    frames = max(stream.frames_in_chunk(0), stream.frames_in_chunk(1))  # the largest chunk's
    length = frames * stream.tokens_per_frame
    local = length // sp_degree
    channels = config.dim // sp_degree
    rotation = (2 if b >= ROPE_BYTES else 3) * length * channels * ROPE_BYTES
    if isinstance(config.audio, InfiniteTalkAudioConfig):
        # the projected audio tokens and every block's keys/values of them, once per chunk
        audio = config.audio
        tokens = frames * audio.context_tokens
        held = tokens * audio.output_dim * b + n * 2 * tokens * config.dim * b
    else:
        audio_tokens = 0 if config.audio is None else frames * config.audio.num_tokens
        held = n * 2 * audio_tokens * config.dim * b  # one speaking character
    copies = 2 if sp_degree > 1 else 1
    if stream.window == "convkv-memory":
        # LiveAct's pre-RoPE cache: the chunk's keys and values go into it as they are; the queries are
        # rotated, then the window's visible keys are rotated at use, whose float32 arithmetic over 14 frames
        # (the rotated keys included) is the peak
        window = stream.kv_cache_tokens
        window_rotation = (2 if b >= ROPE_BYTES else 3) * window * channels * ROPE_BYTES
        attention = 2 * length * channels * b * copies + window_rotation
    else:
        qkv = 3 * length * channels * b * copies
        attention = qkv + length * channels * b + rotation
    ffn = 2 * local * config.ffn_dim * b
    residual = 3 * local * config.dim * 4 + 2 * length * config.patch_out_dim * 4
    return held + max(attention, ffn) + residual


class LiveTensorBytes(TorchDispatchMode):
    """Traces the bytes of tensors created inside the mode and still alive; ``peak`` is their maximum.

    Storages are counted once (views share them); outputs that alias a tensor created before the mode
    (in-place updates of a cache, views of weights) are not counted. Works on the meta device, so the peak of
    a forward of the 18B model costs no memory. It follows eager execution's lifetimes, not an allocator's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self._refs:
                if aliases:
                    continue
                self._refs[key] = 0
                self._sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@functools.lru_cache(maxsize=16)
def vae_sizes(preset: str, height: int, width: int, latents_per_call: int = 1) -> dict[str, int]:
    """Parameters of VAE ``preset``, its decode cache (elements) per session at height x width, and the
    activation peak (bytes, float32) of one decode step (``latents_per_call`` latents: 1, or a chunk's
    under ``--vae-chunk-at-once``) and of one 4-frame encode step (meta device)."""
    from decoder.feature_cache import FeatureCache
    from decoder.vae import build_vae
    from proto.vae_config import get_vae_preset

    cfg = get_vae_preset(preset)
    vae = build_vae(cfg, device="meta")
    lat_h, lat_w = height // cfg.spatial_stride, width // cfg.spatial_stride
    cache = FeatureCache(dtype=VAE_DTYPE)
    latent = torch.empty(1, cfg.z_dim, latents_per_call, lat_h, lat_w, device="meta")
    with torch.no_grad():
        vae.decode_step(latent, cache)  # the first step allocates the cache
        with LiveTensorBytes() as decode:
            vae.decode_step(latent, cache)
        enc_cache = FeatureCache(dtype=VAE_DTYPE)
        vae.encode_step(torch.empty(1, 3, 1, height, width, device="meta"), enc_cache)
        frames = torch.empty(1, 3, cfg.temporal_stride, height, width, device="meta")
        with LiveTensorBytes() as encode:
            vae.encode_step(frames, enc_cache)
    return {
        "parameters": sum(p.numel() for p in vae.parameters()),
        "decode_cache_elements": sum(buf.numel() for buf in cache.buffers),
        "encode_cache_elements": sum(buf.numel() for buf in enc_cache.buffers),
        "decode_peak": decode.peak,
        "encode_peak": encode.peak,
    }


@functools.lru_cache(maxsize=16)
def taehv_sizes(height: int, width: int, latents_per_call: int = 1) -> dict[str, int]:
    """``--vae-decoder taew2.1`` (``decoder.taehv``): its parameters, its stream state (elements) per session
    at height x width and the activation peak (bytes, float32) of one decoder call over ``latents_per_call``
    latents (meta device, as ``vae_sizes``)."""
    from decoder.taehv import SPATIAL_STRIDE, TAEHVState, build_taehv

    model = build_taehv(device="meta")
    state = TAEHVState()
    latent = torch.empty(
        latents_per_call, 16, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE, device="meta"
    )
    with torch.no_grad():
        model.decode_step(latent, state)  # the first call allocates the state
        with LiveTensorBytes() as decode:
            model.decode_step(latent, state)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "decode_cache_elements": sum(buf.numel() for buf in state.buffers),
        "decode_peak": decode.peak,
    }


@dataclass(frozen=True)
class EncoderSources:
    """Where the master's conditioning encoders come from (None: the tiny random ones)."""

    clip_checkpoint: str | None = None
    umt5_checkpoint: str | None = None
    wav2vec_checkpoint: str | None = None


def _weight_file_bytes(path: str, wan_name: str | None = None) -> int:
    """Bytes of an encoder's weights: a Wan-format file (given, or ``wan_name`` inside a published folder)
    counts its size — an upper bound for CLIP, whose file also holds the text tower the I2V path never
    loads; a Hugging Face folder counts its weight files."""
    from frontends.wan_encoders import find_wan_file

    wan_file = None if wan_name is None else find_wan_file(path, wan_name)
    if wan_file is not None:
        return wan_file.stat().st_size
    folder = Path(path)
    if not folder.is_dir():
        return 0  # a missing path is reported by the option checks, not here
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


@functools.lru_cache(maxsize=16)
def _tiny_encoder_bytes(config: ModelConfig) -> dict[str, int]:
    from transformers import CLIPVisionModel, UMT5EncoderModel, Wav2Vec2Model

    from frontends.audio_features import AudioFeaturizerConfig, tiny_wav2vec2_config
    from frontends.conditioning import ConditioningConfig, tiny_clip_config, tiny_umt5_config

    cond = ConditioningConfig.for_model(config)
    # both audio variants' front-ends build the tiny wav2vec2 at the model's wav2vec2 width and depth
    default = AudioFeaturizerConfig()
    hidden, layers = (
        (default.tiny_hidden_size, default.tiny_layers)
        if config.audio is None
        else (config.audio.wav2vec_dim, config.audio.wav2vec_layers)
    )
    models = {
        "clip": lambda: CLIPVisionModel(tiny_clip_config(cond.clip_dim, cond.clip_image_size)),
        "umt5": lambda: UMT5EncoderModel(tiny_umt5_config(cond.text_dim)),
        "wav2vec2": lambda: Wav2Vec2Model(tiny_wav2vec2_config(hidden, layers)),
    }
    out = {}
    for name, build in models.items():
        with torch.device("meta"):
            model = build()
        out[name] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return out


def encoder_bytes(config: ModelConfig, sources: EncoderSources = EncoderSources()) -> int:
    """Bytes of the umT5, CLIP and wav2vec2 weights the master loads (CLIP only for i2v presets)."""
    tiny = _tiny_encoder_bytes(config)
    parts = {
        "umt5": sources.umt5_checkpoint,
        "wav2vec2": sources.wav2vec_checkpoint,
        **({"clip": sources.clip_checkpoint} if config.has_image_branch else {}),
    }
    from frontends.wan_encoders import WAN_CLIP_FILE, WAN_UMT5_FILE

    wan_names = {"clip": WAN_CLIP_FILE, "umt5": WAN_UMT5_FILE}
    return sum(
        tiny[name] if path is None else _weight_file_bytes(path, wan_names.get(name))
        for name, path in parts.items()
    )


# ---- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds, in bytes; the ``*_per_session`` parts scale with ``sessions``."""

    rank: int
    role: str
    device: str
    sessions: int
    dit_weights: int = 0
    kv_cache_per_session: int = 0
    dit_activations: int = 0
    vae_weights: int = 0
    encoder_weights: int = 0
    decode_cache_per_session: int = 0
    decode_activations: int = 0

    @property
    def weights(self) -> int:
        return self.dit_weights + self.vae_weights + self.encoder_weights

    @property
    def kv_cache(self) -> int:
        return self.kv_cache_per_session * self.sessions

    @property
    def decode_cache(self) -> int:
        return self.decode_cache_per_session * self.sessions

    @property
    def activations(self) -> int:
        """A colocated rank scores and decodes in turn, so only the larger of the two peaks counts."""
        return max(self.dit_activations, self.decode_activations)

    @property
    def planned(self) -> int:
        """Everything but the margin."""
        return self.weights + self.kv_cache + self.decode_cache + self.activations

    @property
    def margin(self) -> int:
        fixed = CUDA_FIXED_MARGIN if self.device == "cuda" else CPU_FIXED_MARGIN
        return fixed + math.ceil(MARGIN_FRACTION * self.planned)

    @property
    def total(self) -> int:
        return self.planned + self.margin

    def describe(self) -> str:
        """One line: the parts of this rank."""
        parts = []
        if self.dit_weights:
            parts.append(f"DiT weights {gib(self.dit_weights)}")
        if self.kv_cache_per_session:
            per = gib(self.kv_cache_per_session)
            parts.append(f"KV cache {per} x {self.sessions} = {gib(self.kv_cache)}")
        if self.dit_activations:
            parts.append(f"DiT activations {gib(self.dit_activations)}")
        if self.vae_weights or self.encoder_weights:
            parts.append(f"VAE + encoder weights {gib(self.vae_weights + self.encoder_weights)}")
        if self.decode_cache_per_session:
            per = gib(self.decode_cache_per_session)
            parts.append(f"decode cache {per} x {self.sessions} = {gib(self.decode_cache)}")
        if self.decode_activations:
            parts.append(f"VAE activations {gib(self.decode_activations)}")
        parts.append(f"margin {gib(self.margin)}")
        return f"rank {self.rank} ({self.role}): {gib(self.total)} = " + " + ".join(parts)


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of one serving group (see the module docstring); built by ``plan_memory``."""

    preset: str
    height: int
    width: int
    score_workers: int
    decoder: str
    device: str
    dtype: torch.dtype
    sessions: int
    topology_name: str
    ranks: tuple[RankPlan, ...]

    def demands(self) -> list[tuple[str, int]]:
        """(what, bytes) per device: each rank's GPU on CUDA; the host, shared by all ranks, on CPU."""
        if self.device == "cuda":
            return [(f"rank {r.rank}'s GPU", r.total) for r in self.ranks]
        return [(f"the host ({len(self.ranks)} rank(s))", sum(r.total for r in self.ranks))]

    def need(self) -> int:
        """The most any one device must hold."""
        return max(total for _, total in self.demands())

    def fits(self, available: int) -> bool:
        """Whether every device's share fits ``available`` bytes (per GPU on CUDA, the host's on CPU)."""
        return self.need() <= available

    def summary(self) -> str:
        """The start-up line: the topology, the largest rank's total and its parts."""
        dtype = str(self.dtype).removeprefix("torch.")
        head = (
            f"memory plan: {self.topology_name}, {self.preset} {dtype} at {self.height}x{self.width}, "
            f"{self.sessions} session(s): "
        )
        if self.device == "cuda":
            big = max(self.ranks, key=lambda r: r.total)
            return head + f"{gib(big.total)} on the largest GPU; " + big.describe()
        return head + f"{gib(self.need())} of host memory; " + "; ".join(r.describe() for r in self.ranks)


def plan_memory(
    config: ModelConfig,
    stream: StreamConfig,
    topology: Topology,
    *,
    sessions: int = 1,
    dtype: torch.dtype | None = None,
    vae_preset: str | None = None,
    encoders: EncoderSources = EncoderSources(),
    vae_chunk_at_once: bool = False,
    fp8_linear: bool = False,
    kv_cache_dtype: str = "auto",
    vae_decoder: str = "wan2.1",
) -> MemoryPlan:
    """Bytes per rank of ``topology`` serving ``sessions`` streams of ``stream`` with the DiT of ``config``.

    fp8_linear / kv_cache_dtype: ``--fp8 linear`` / ``--kv-cache-dtype`` (the FP8 weights and cache sizes).
    dtype: the DiT's (default: ``default_dtype(topology.device)``). vae_preset: default ``tiny`` for the
    tiny preset, ``wan2.1`` otherwise (as ``run``/``serve`` choose). vae_chunk_at_once: the decoder takes
    a whole chunk per call (``--vae-chunk-at-once``), so its activation peak is a chunk's, not a latent's.
    vae_decoder: ``taew2.1`` decodes with ``decoder.taehv`` (``taehv_sizes``): the master holds its weights
    beside the Wan VAE (which still encodes the reference image), its stream state instead of the Wan decode
    cache and its activation peak instead of the Wan decoder's.
    """
    if sessions < 1:
        raise ValueError(f"a memory plan needs at least one session, got {sessions}")
    dtype = dtype or default_dtype(topology.device)
    vae_preset = vae_preset or vae_preset_for(config.name)
    p = topology.score_workers
    kv = kv_cache_bytes(config, stream, p, dtype, kv_cache_dtype)
    if topology.step_pipeline:  # a stage rank keeps its own step's self-attention cache only
        kv["self_attn"] //= stream.num_kv_caches
    worker = {
        "dit_weights": dit_weight_bytes(config, dtype, fp8_linear),
        "kv_cache_per_session": sum(kv.values()),
        "dit_activations": dit_activation_bytes(config, stream, p, dtype),
    }
    vae = vae_sizes(
        vae_preset, stream.height, stream.width, stream.chunk_latent_frames if vae_chunk_at_once else 1
    )
    vae_bytes = _bytes(VAE_DTYPE)
    y = (
        20 * stream.train_latent_frames * stream.latent_height * stream.latent_width * 4
        if (config.has_image_branch)
        else 0
    )
    master = {
        "vae_weights": vae["parameters"] * vae_bytes,
        "encoder_weights": encoder_bytes(config, encoders),
        "decode_cache_per_session": vae["decode_cache_elements"] * vae_bytes + y,
        "decode_activations": max(
            vae["decode_peak"], vae["encode_peak"] + vae["encode_cache_elements"] * vae_bytes
        ),
    }
    if vae_decoder == "taew2.1":
        fast = taehv_sizes(
            stream.height, stream.width, stream.chunk_latent_frames if vae_chunk_at_once else 1
        )
        master["vae_weights"] += fast["parameters"] * vae_bytes
        master["decode_cache_per_session"] = fast["decode_cache_elements"] * vae_bytes + y
        master["decode_activations"] = max(
            fast["decode_peak"], vae["encode_peak"] + vae["encode_cache_elements"] * vae_bytes
        )
    ranks = []
    for rank in range(topology.world_size):
        parts: dict[str, int] = {}
        if rank == topology.master_rank:
            parts |= master
        if topology.is_worker(rank):
            parts |= worker
        ranks.append(
            RankPlan(rank=rank, role=topology.role(rank), device=topology.device, sessions=sessions, **parts)
        )
    return MemoryPlan(
        preset=config.name,
        height=stream.height,
        width=stream.width,
        score_workers=p,
        decoder=topology.decoder,
        device=topology.device,
        dtype=dtype,
        sessions=sessions,
        topology_name=topology.name,
        ranks=tuple(ranks),
    )


# ---- alternatives and the refusal ----------------------------------------------------------------------


@dataclass(frozen=True)
class Alternative:
    """A change that makes the plan fit: ``option`` as the user would type it, and the re-planned need."""

    option: str
    plan: MemoryPlan


def sp_degrees(config: ModelConfig, stream: StreamConfig) -> list[int]:
    """Score-worker counts that divide the heads and a frame's tokens (``workers.sp.check_sp_shapes``)."""
    heads, tokens = config.num_heads, stream.tokens_per_frame
    return [p for p in range(1, heads + 1) if heads % p == 0 and tokens % p == 0]


def _smaller_sizes(height: int, width: int, score_workers: int) -> list[tuple[int, int]]:
    """Sizes below height x width with the same aspect (to within a multiple of 16), largest first."""
    sizes = []
    for eighths in range(7, 0, -1):
        h, w = (height * eighths // 8) // 16 * 16, (width * eighths // 8) // 16 * 16
        if h >= 16 and w >= 16 and (h // 16) * (w // 16) % score_workers == 0 and (h, w) not in sizes:
            sizes.append((h, w))
    return sizes


def alternatives(
    plan: MemoryPlan,
    config: ModelConfig,
    stream: StreamConfig,
    topology: Topology,
    available: int,
    *,
    sessions_option: str | None = "max_sessions",
    **plan_kwargs: Any,
) -> list[Alternative]:
    """The first option of each kind that fits ``available`` (re-planned with ``plan_memory``): more SP
    ranks (the smallest valid ``--score-workers`` above the current one), fewer sessions (the most that fit;
    only when ``sessions_option`` names the setting), a lower resolution (the largest that fits)."""

    def replan(topo: Topology, strm: StreamConfig, sessions: int) -> MemoryPlan:
        return plan_memory(config, strm, topo, sessions=sessions, **{**plan_kwargs, "dtype": plan.dtype})

    found = []
    for p in sp_degrees(config, stream):
        if p <= topology.score_workers:
            continue
        candidate = replan(dataclasses.replace(topology, score_workers=p), stream, plan.sessions)
        if candidate.fits(available):
            gpus = f" ({candidate.ranks[-1].rank + 1} GPUs)" if topology.device == "cuda" else ""
            found.append(Alternative(f"--score-workers {p}{gpus}", candidate))
            break
    if sessions_option is not None:
        for sessions in range(plan.sessions - 1, 0, -1):
            candidate = replan(topology, stream, sessions)
            if candidate.fits(available):
                found.append(Alternative(f"{sessions_option} = {sessions}", candidate))
                break
    for h, w in _smaller_sizes(stream.height, stream.width, topology.score_workers):
        candidate = replan(topology, dataclasses.replace(stream, height=h, width=w), plan.sessions)
        if candidate.fits(available):
            found.append(Alternative(f"--resolution {h}x{w}", candidate))
            break
    return found


def refusal_message(plan: MemoryPlan, available: int, found: Sequence[Alternative], source: str) -> str:
    """Why the plan does not fit ``available`` bytes (measured by ``source``) and what would."""
    lines = [
        f"{plan.topology_name} with {plan.preset} ({str(plan.dtype).removeprefix('torch.')}) at "
        f"{plan.height}x{plan.width} for {plan.sessions} session(s) does not fit: it needs "
        f"{gib(plan.need())} where {gib(available)} is available ({source})",
    ]
    lines += [f"  {r.describe()}" for r in plan.ranks]
    if found:
        lines.append("  what would fit:")
        lines += [f"    {a.option}: needs {gib(a.plan.need())}" for a in found]
    else:
        lines.append(
            "  no more score workers, fewer sessions or lower resolution fits this budget; a device with "
            "more free memory is needed"
        )
    return "\n".join(lines)


# ---- the device's memory -------------------------------------------------------------------------------


def host_available_bytes() -> int:
    """The host's available memory: /proc/meminfo MemAvailable (psutil's figure elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


_CUDA_PROBE = "import sys, torch\nprint(min(torch.cuda.mem_get_info(int(i))[0] for i in sys.argv[1:]))\n"


def cuda_free_bytes(devices: Sequence[int]) -> int:
    """The least free memory among CUDA ``devices``, measured by ``torch.cuda.mem_get_info`` in a child
    process, so that this process (which launches the ranks, or becomes rank 0) holds no CUDA context."""
    result = subprocess.run(
        [sys.executable, "-c", _CUDA_PROBE, *map(str, devices)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise ValueError(
            f"could not read the GPUs' free memory ({result.stderr.strip().splitlines()[-1:]}); "
            "pass --device-memory GIB to plan without measuring"
        )
    return int(result.stdout.strip())


def available_bytes(plan: MemoryPlan, device_memory_gib: float | None) -> tuple[int | None, str]:
    """The budget per device and where it came from: the override, else the GPUs' least free memory (one
    GPU per rank, devices 0..world-1), else the host's MemAvailable. (None, why) when there is nothing to
    measure: ``--device cuda`` where no GPU is visible (the ranks then fail on their own)."""
    if device_memory_gib is not None:
        return int(device_memory_gib * GIB), "--device-memory"
    if plan.device == "cuda":
        if not torch.cuda.is_available():
            return None, "no GPU visible to measure"
        # One GPU per rank on this machine: devices 0..world-1 (fewer under a multi-node torchrun).
        devices = range(min(len(plan.ranks), torch.cuda.device_count()))
        return cuda_free_bytes(devices), "free memory of the GPUs (torch.cuda.mem_get_info)"
    return host_available_bytes(), "the host's MemAvailable"


def check_memory(
    config: ModelConfig,
    stream: StreamConfig,
    topology: Topology,
    device_memory_gib: float | None,
    *,
    sessions: int = 1,
    sessions_option: str | None = None,
    **plan_kwargs: Any,
) -> MemoryPlan:
    """Plan, measure, and return the plan if it fits; raise ``ValueError`` with ``refusal_message`` if not."""
    if device_memory_gib is not None and not (math.isfinite(device_memory_gib) and device_memory_gib > 0):
        raise ValueError(f"--device-memory must be a positive number of GiB, got {device_memory_gib}")
    plan = plan_memory(config, stream, topology, sessions=sessions, **plan_kwargs)
    available, source = available_bytes(plan, device_memory_gib)
    if available is None or plan.fits(available):
        return plan
    found = alternatives(
        plan, config, stream, topology, available, sessions_option=sessions_option, **plan_kwargs
    )
    raise ValueError(refusal_message(plan, available, found, source))


def _options_dtype(options: Any) -> torch.dtype | None:
    """The DiT dtype an options object asks for (a ``dtype`` field, name or torch.dtype), else None."""
    dtype = getattr(options, "dtype", None)
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, str(dtype))


def options_plan_kwargs(options: Any) -> dict[str, Any]:
    """``plan_memory`` keyword arguments from ``run``/``serve`` options (dtype, VAE, encoder checkpoints)."""
    return {
        "dtype": _options_dtype(options),
        "vae_preset": vae_preset_for(options.preset),
        "vae_chunk_at_once": bool(getattr(options, "vae_chunk_at_once", False)),
        "fp8_linear": getattr(options, "fp8", "off") == "linear",
        "kv_cache_dtype": str(getattr(options, "kv_cache_dtype", "auto")),
        "vae_decoder": str(getattr(options, "vae_decoder", "wan2.1")),
        "encoders": EncoderSources(
            clip_checkpoint=options.clip_checkpoint,
            umt5_checkpoint=options.umt5_checkpoint,
            wav2vec_checkpoint=options.wav2vec_checkpoint,
        ),
    }


def plan_for_options(options: Any, sessions: int = 1) -> MemoryPlan:
    """The plan of ``run``/``serve`` options (``server.options.GroupOptions`` and its subclasses)."""
    return plan_memory(
        options.model_config,
        options.stream_config(),
        options.topology(),
        sessions=sessions,
        **options_plan_kwargs(options),
    )


def check_options_memory(options: Any, sessions: int = 1, sessions_option: str | None = None) -> MemoryPlan:
    """``check_memory`` for ``run``/``serve`` options, with their ``device_memory_gib`` override."""
    return check_memory(
        options.model_config,
        options.stream_config(),
        options.topology(),
        options.device_memory_gib,
        sessions=sessions,
        sessions_option=sessions_option,
        **options_plan_kwargs(options),
    )

"""`talkingmachines inspect --preset NAME`: parameters, memory and FLOPs of a preset, allocating no weights.

The model is built on the meta device, so parameter counts are exact for the code in workers/model.py while
costing no memory even for the 18B preset. Memory and FLOPs are analytic (wan.md §5.4 and §7):

- weights: parameters × 2 bytes (bf16);
- self-attention KV cache per session (`per-step` mode, the default): for every denoising step s the keys
  and values of c_0 and c_{t−1}, each one chunk of L_chunk = F · tokens_per_frame tokens:
  ``steps · 2 chunks · L_chunk · dim · layers · 2 (K and V) · 2 bytes``. `clean-context` keeps one set (the
  clean keys): the same formula with steps = 1;
- cross-attention K/V per session (text, and the 257 CLIP tokens for i2v), computed once:
  ``L_ctx · dim · layers · 2 (K and V) · 2 bytes``;
- FLOPs per forward (a multiply-add = 2 FLOPs, Lq = L_chunk): linear layers ``(12·dim² + 4·dim·ffn) · Lq ·
  layers``, self-attention ``4 · Lq · L_kv · dim · layers``, cross-attention ``4 · Lq · L_ctx · dim ·
  layers``, patch embedding, head and time embedding, plus the audio path (projection MLP per latent frame,
  audio k/v projections and the frame-local audio attention in every block). In both cache modes the
  steady-state chunk (t ≥ 2) attends to c_0, c_{t−1} and itself: L_kv = 3 · L_chunk (9216 at 512², F = 3);
  chunks 0 and 1 see L_chunk and 2 · L_chunk. A chunk costs len(steps) forwards in `per-step` mode and one
  more (the σ = 0 refresh) in `clean-context` mode.

Parameters are split into Wan 2.1's, the audio path's (either variant: `workers.checkpoint.is_audio_key`) and
the ConvKV memory's. The stream is the preset's schedule (`ModelConfig.stream_schedule`): for the
SoulX-LiveAct presets, LiveAct's (chunks of 6 then 8 latent frames; per denoising step, plus per audio step
with audio CFG, a cache of the 14-frame window, `StreamConfig.num_kv_caches`; a chunk of 8 frames
attends to the whole window, L_kv = 14 · tokens_per_frame, chunk 0 to its own 6; step 0 runs without the audio
path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from proto.model_config import InfiniteTalkAudioConfig, ModelConfig, get_model_preset, model_preset_names
from proto.stream_config import StreamConfig
from workers.checkpoint import is_audio_key
from workers.model import WanModel

BF16_BYTES = 2
CHARACTERS = 1  # audio FLOPs are given for one speaking character; each extra character adds its share

_WAN_PARTS = (
    "patch_embedding",
    "text_embedding",
    "time_embedding",
    "time_projection",
    "blocks",
    "head",
    "img_emb",
)


def _part(key: str) -> str:
    """Report section of a parameter: its top-level module, with the audio layers (TalkingMachines: the audio
    k/v of the cross-attention; infinitetalk: norm_x and audio_cross_attn) and the ConvKV memory inside blocks
    split out."""
    parts = key.split(".")
    if parts[0] == "blocks" and is_audio_key(key):
        frame_audio = "audio_cross_attn" in parts or "norm_x" in parts
        return "blocks (audio cross-attn)" if frame_audio else "blocks (audio k/v)"
    if parts[0] == "blocks" and any(p.startswith("memory_proj") for p in parts):
        return "blocks (ConvKV memory)"
    return parts[0]


def _parameters(config: ModelConfig) -> dict[str, Any]:
    with torch.device("meta"):
        model = WanModel(config)
    parts: dict[str, int] = {}
    for key, param in model.named_parameters():
        parts[_part(key)] = parts.get(_part(key), 0) + param.numel()
    total = sum(parts.values())
    audio = sum(n for name, n in parts.items() if "audio" in name)
    memory = sum(n for name, n in parts.items() if "memory" in name)
    ordered = {name: parts[name] for name in _WAN_PARTS if name in parts}
    ordered |= {name: n for name, n in parts.items() if name not in ordered}
    return {"total": total, "wan": total - audio - memory, "audio": audio, "memory": memory, "parts": ordered}


def _context_tokens(config: ModelConfig) -> int:
    return config.text_len + (config.clip_tokens if config.has_image_branch else 0)


def _kv_cache(config: ModelConfig, stream: StreamConfig) -> dict[str, Any]:
    slots = stream.num_steps if stream.cache_mode == "per-step" else 1
    chunk = stream.tokens_per_chunk
    cross = _context_tokens(config) * config.dim * config.num_layers * 2 * BF16_BYTES
    if stream.window == "convkv-memory":
        slots, window = stream.num_kv_caches, stream.kv_cache_tokens
        self_attn = slots * window * config.dim * config.num_layers * 2 * BF16_BYTES
        formula = (
            f"{slots} caches (one per denoising step{', + null audio' if stream.audio_cfg > 1 else ''}) × "
            f"{stream.train_latent_frames} frames (sink, ConvKV memory, neighbours, chunk) × "
            f"{stream.tokens_per_frame} tokens × dim {config.dim} × {config.num_layers} layers × 2 (K, V) × "
            f"{BF16_BYTES} B"
        )
    else:
        self_attn = slots * 2 * chunk * config.dim * config.num_layers * 2 * BF16_BYTES
        kind = "one per denoising step" if stream.cache_mode == "per-step" else "clean keys"
        formula = (
            f"{slots} slot(s) ({kind})"
            f" × 2 chunks (c_0, c_t-1) × {chunk} tokens × dim {config.dim} × {config.num_layers} layers"
            f" × 2 (K, V) × {BF16_BYTES} B"
        )
    return {
        "cache_mode": stream.cache_mode,
        "slots": slots,
        "tokens_per_chunk": chunk,
        "self_attn_bytes": self_attn,
        "self_attn_formula": formula,
        "cross_attn_tokens": _context_tokens(config),
        "cross_attn_bytes": cross,
        "total_bytes": self_attn + cross,
    }


def _audio_flops_per_forward(config: ModelConfig, lq: int, frames: int) -> int:
    audio = config.audio
    if audio is None:
        return 0
    d = config.dim
    if isinstance(audio, InfiniteTalkAudioConfig):
        # One speaker; every latent frame of a steady-state chunk is a later frame (proj1_vf).
        inter, out = audio.intermediate_dim, audio.context_tokens * audio.output_dim
        projection = 2 * frames * (audio.later_frame_dim * inter + inter**2 + inter * out)
        kv = 2 * audio.output_dim * 2 * d * frames * audio.context_tokens
        q_and_proj = 2 * 2 * d * d * lq
        attn = 4 * lq * audio.context_tokens * d  # each query sees its frame's context_tokens tokens
        return projection + (kv + q_and_proj + attn) * config.num_layers
    out = audio.num_tokens * audio.token_dim
    mlp = audio.input_dim * audio.hidden_dim + audio.hidden_dim**2 + audio.hidden_dim * out
    projection = 2 * mlp * frames * CHARACTERS
    tokens = frames * audio.num_tokens * CHARACTERS
    kv = 2 * 2 * audio.token_dim * d * tokens
    # Each query attends only to its own frame's num_tokens audio tokens (QKᵀ and AV: 4·Lq·N·d).
    attn = 4 * lq * audio.num_tokens * d * CHARACTERS
    return projection + (kv + attn) * config.num_layers


def flops_per_forward(
    config: ModelConfig, stream: StreamConfig, l_kv: int, frames: int | None = None
) -> dict[str, int]:
    """FLOPs of one forward over one chunk (of `frames` latent frames; default the stream's chunk size) whose
    queries see `l_kv` self-attention keys (wan.md §7)."""
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    frames = stream.chunk_latent_frames if frames is None else frames
    lq = frames * stream.tokens_per_frame
    patch = math.prod(config.patch_size)
    linear = (12 * d * d + 4 * d * f) * lq * n
    self_attn = 4 * lq * l_kv * d * n
    cross_attn = 4 * lq * _context_tokens(config) * d * n
    time = 2 * frames * (config.freq_dim * d + d * d + 6 * d * d)
    embed_head = 2 * lq * config.in_dim * patch * d + 2 * lq * d * config.patch_out_dim + time
    audio = _audio_flops_per_forward(config, lq, frames)
    total = linear + self_attn + cross_attn + embed_head + audio
    return {
        "linear": linear,
        "self_attn": self_attn,
        "cross_attn": cross_attn,
        "embed_head": embed_head,
        "audio": audio,
        "total": total,
        "total_without_audio": total - audio,
    }


def _session_context_flops(config: ModelConfig) -> int:
    """One-time per session: text MLP, CLIP MLP (i2v) and the cross-attention K/V of every block."""
    d = config.dim
    text = 2 * config.text_len * (config.text_dim * d + d * d)
    image = (
        2 * config.clip_tokens * (config.clip_dim**2 + config.clip_dim * d) if config.has_image_branch else 0
    )
    kv = 4 * d * d * _context_tokens(config) * config.num_layers
    return text + image + kv


def _convkv_flops(config: ModelConfig, stream: StreamConfig) -> dict[str, Any]:
    """LiveAct's schedule: chunk 0 (6 frames) sees itself, every later chunk (8) the 14-frame window; a chunk
    is one pass per step, plus a null-audio pass per audio step with audio CFG; step 0 skips the audio
    path."""
    window = stream.train_latent_frames * stream.tokens_per_frame
    audio_passes = stream.num_steps - stream.audio_from_step
    passes = stream.num_steps + (audio_passes if stream.audio_cfg > 1 else 0)
    silent = passes - audio_passes * (2 if stream.audio_cfg > 1 else 1)  # passes without the audio path

    def chunk(frames: int, l_kv: int) -> int:
        per = flops_per_forward(config, stream, l_kv, frames)
        return passes * per["total"] - silent * per["audio"]

    first = stream.frames_in_chunk(0)
    return {
        "l_q": stream.tokens_per_chunk,
        "l_kv": window,
        "l_kv_note": f"every chunk after the first: the {stream.train_latent_frames}-frame window; chunk 0 "
        f"({first} frames) sees itself",
        "l_ctx": _context_tokens(config),
        "forwards_per_chunk": passes,
        "per_forward": flops_per_forward(config, stream, l_kv=window),
        "per_chunk": chunk(stream.chunk_latent_frames, window),
        "per_chunk_chunk0": chunk(first, first * stream.tokens_per_frame),
        "per_chunk_chunk1": chunk(stream.chunk_latent_frames, window),
        "per_session_context": _session_context_flops(config),
        "audio_characters": CHARACTERS if config.audio is not None else 0,
    }


def _flops(config: ModelConfig, stream: StreamConfig) -> dict[str, Any]:
    if stream.window == "convkv-memory":
        return _convkv_flops(config, stream)
    chunk = stream.tokens_per_chunk
    forwards = stream.num_steps + (1 if stream.cache_mode == "clean-context" else 0)
    steady = flops_per_forward(config, stream, l_kv=3 * chunk)
    return {
        "l_q": chunk,
        "l_kv": 3 * chunk,
        "l_kv_note": "steady state (chunk t >= 2): c_0 + c_t-1 + c_t; chunk 0 sees 1 chunk, chunk 1 sees 2",
        "l_ctx": _context_tokens(config),
        "forwards_per_chunk": forwards,
        "per_forward": steady,
        "per_chunk": forwards * steady["total"],
        "per_chunk_chunk0": forwards * flops_per_forward(config, stream, l_kv=chunk)["total"],
        "per_chunk_chunk1": forwards * flops_per_forward(config, stream, l_kv=2 * chunk)["total"],
        "per_session_context": _session_context_flops(config),
        "audio_characters": CHARACTERS if config.audio is not None else 0,
    }


def describe_preset(
    name: str,
    height: int | None = None,
    width: int | None = None,
    stream_cfg: StreamConfig | None = None,
) -> dict[str, Any]:
    """Parameters, memory and FLOPs of preset `name` for one stream (meta device: nothing is allocated).

    The stream settings (chunk frames, steps, cache mode) come from `stream_cfg` (default: the preset's
    stream schedule at 512×512; the TalkingMachines schedule's 3 latent frames, 2 steps, per-step cache);
    `height`/`width`, when given, override its resolution.
    Returns a JSON-serialisable dict; bytes and FLOPs are ints.
    """
    config = get_model_preset(name)
    stream = stream_cfg or StreamConfig.for_schedule(config.stream_schedule)
    if height is not None or width is not None:
        stream = dataclasses.replace(stream, height=height or stream.height, width=width or stream.width)
    params = _parameters(config)
    return {
        "preset": name,
        "model_type": config.model_type,
        "config": {
            "dim": config.dim,
            "ffn_dim": config.ffn_dim,
            "num_heads": config.num_heads,
            "num_layers": config.num_layers,
            "in_dim": config.in_dim,
            "audio": config.audio is not None,
            "audio_variant": config.audio_variant,
            "memory": config.memory is not None,
        },
        "stream": {
            "height": stream.height,
            "width": stream.width,
            "chunk_latent_frames": stream.chunk_latent_frames,
            "first_chunk_latent_frames": stream.frames_in_chunk(0),
            "tokens_per_frame": stream.tokens_per_frame,
            "denoising_steps": list(stream.denoising_steps),
            "cache_mode": stream.cache_mode,
        },
        "parameters": params,
        "weights_bf16_bytes": params["total"] * BF16_BYTES,
        "kv_cache": _kv_cache(config, stream),
        "flops": _flops(config, stream),
        "schedule_note": _schedule_note(config, stream),
    }


def _schedule_note(config: ModelConfig, stream: StreamConfig) -> str | None:
    """Said when the report's stream is not the schedule the preset streams."""
    if stream.window == StreamConfig.for_schedule(config.stream_schedule).window:
        return None
    return (
        f"memory and FLOPs describe a {stream.window!r} stream; preset {config.name!r} streams the "
        f"{config.stream_schedule!r} schedule"
    )


def _gb(n: int) -> str:
    """Bytes in decimal units, GB for the real presets and MB/kB for the tiny one."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.2f} kB"


def _tf(n: int) -> str:
    """FLOPs as TFLOP, or GFLOP below one TFLOP."""
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:.3f} GFLOP"


def format_preset_report(d: dict[str, Any]) -> str:
    """Human-readable report of a `describe_preset` dict (sections: Parameters, Memory, FLOPs per chunk)."""
    p, kv, fl, st = d["parameters"], d["kv_cache"], d["flops"], d["stream"]
    width = max(len(name) for name in p["parts"]) + 2
    lines = [
        f"preset {d['preset']} ({d['model_type']}, dim {d['config']['dim']}, "
        f"{d['config']['num_layers']} blocks)",
        f"stream {st['height']}x{st['width']}, {st['chunk_latent_frames']} latent frames/chunk"
        + (
            f" (chunk 0: {st['first_chunk_latent_frames']})"
            if st["first_chunk_latent_frames"] != st["chunk_latent_frames"]
            else ""
        )
        + " "
        f"({st['tokens_per_frame']} tokens/frame), steps {st['denoising_steps']}, cache {st['cache_mode']}",
        "",
        "Parameters",
        f"  {'total':<{width}}{p['total']:>18,}",
        f"  {'Wan 2.1':<{width}}{p['wan']:>18,}",
        f"  {'audio':<{width}}{p['audio']:>18,}",
    ]
    if p["memory"]:
        lines.append(f"  {'ConvKV memory':<{width}}{p['memory']:>18,}")
    lines += [f"    {name:<{width - 2}}{n:>18,}" for name, n in p["parts"].items()]
    lines += [
        "",
        "Memory",
        f"  weights (bf16)               {_gb(d['weights_bf16_bytes'])}",
        f"  self-attn KV cache/session   {_gb(kv['self_attn_bytes'])}  = {kv['self_attn_formula']}",
        f"  cross-attn KV/session        {_gb(kv['cross_attn_bytes'])}  "
        f"({kv['cross_attn_tokens']} context tokens)",
        f"  KV total/session             {_gb(kv['total_bytes'])}",
        "",
        "FLOPs per chunk",
        f"  L_q {fl['l_q']}, L_kv {fl['l_kv']} ({fl['l_kv_note']}), L_ctx {fl['l_ctx']}",
    ]
    per = fl["per_forward"]
    lines += [f"  per forward: {name:<20}{_tf(per[name])}" for name in per]
    lines += [
        f"  forwards per chunk           {fl['forwards_per_chunk']}",
        f"  per chunk                    {_tf(fl['per_chunk'])}  (chunk 0: {_tf(fl['per_chunk_chunk0'])}, "
        f"chunk 1: {_tf(fl['per_chunk_chunk1'])})",
        f"  once per session (context)   {_tf(fl['per_session_context'])}",
    ]
    if fl["audio_characters"]:
        lines.append(f"  audio FLOPs counted for {fl['audio_characters']} character(s)")
    if d["schedule_note"]:
        lines += ["", f"Note: {d['schedule_note']}"]
    return "\n".join(lines)


def run_inspect(preset: str, height: int | None = None, width: int | None = None) -> str:
    """The text `talkingmachines inspect --preset NAME` prints."""
    return format_preset_report(describe_preset(preset, height, width))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="talkingmachines inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=model_preset_names())
    parser.add_argument("--height", type=int, default=None, help="pixels (default 512)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 512)")
    parser.add_argument(
        "--cache-mode",
        choices=("per-step", "clean-context"),
        default=None,
        help="the TalkingMachines schedule's cache mode (default: per-step; LiveAct's is per-step only)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = parser.parse_args(argv)
    schedule = get_model_preset(args.preset).stream_schedule
    overrides = {} if args.cache_mode is None else {"cache_mode": args.cache_mode}
    stream = StreamConfig.for_schedule(schedule, **overrides)
    described = describe_preset(args.preset, args.height, args.width, stream)
    print(json.dumps(described, indent=2) if args.json else format_preset_report(described))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming DiT cost does not grow with the stream: per-chunk time and cache memory at chunk 2 vs chunk 200.

    python -m benchmarks.dit_cache --out benchmarks/results/dit_cache_cpu.json

The tiny preset streams on this CPU with one thread (window positions, per-step cache, 2 steps, audio and I2V
conditioning on). One long session runs `--chunks` chunks. Chunk 2 is the first steady-state chunk (it
attends to c_0, c_{t−1} and itself, like every later chunk), so its time is measured on fresh short sessions
(chunks 0, 1, 2); those short sessions are interleaved with the long session's chunks around chunk 200, so
both medians see the same machine load. Memory is the storage bytes of every tensor the long session holds
(self-attention cache and cross-attention K/V), read after chunk 2 and after chunk 200. Allocations per
denoising step: one more chunk 2 (a fresh session) and the long session's last chunk (after the timed ones,
so profiling slows no timed chunk) run under `torch.profiler.profile(profile_memory=True)`; every profiled op
whose own (self) CPU memory usage is positive counts as an allocation of that many bytes, summed over the
chunk and divided by its passes.

Targets (issue 2): time ratio chunk 200 / chunk 2 ≤ 1.05, memory ratio exactly 1.00; allocations per step
flat (the same count and bytes at chunk 2 and late in the stream).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import provenance
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning
from workers.model import WanModel
from workers.streaming import SessionState, StreamingDiT


def _session_bytes(state: SessionState) -> int:
    """Storage bytes of every tensor the session holds (counted from the tensors, not from state.nbytes)."""
    tensors = [state.cache.k, state.cache.v, *(t for kv in state.cross_kv for t in kv.values())]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _Inputs:
    """Per-chunk inputs of one synthetic session (I2V conditioning, one speaking character, noise)."""

    def __init__(self, engine: StreamingDiT, seed: int) -> None:
        cfg = engine.model.config
        stream = engine.stream
        audio = cfg.audio
        assert audio is not None, "the benchmark preset needs audio layers"
        self.gen = torch.Generator().manual_seed(seed)
        f, h, w = stream.chunk_latent_frames, stream.latent_height, stream.latent_width
        self.context = torch.randn(cfg.text_len, cfg.text_dim, generator=self.gen)
        self.clip = torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=self.gen)
        self.y = torch.randn(cfg.in_dim - cfg.out_dim, f, h, w, generator=self.gen)
        self.feature_shape = (
            1,
            1,
            f + audio.window - 1,
            audio.frames_per_latent,
            audio.wav2vec_layers,
            audio.wav2vec_dim,
        )
        self.noise_shape = (stream.num_steps, *stream.latent_chunk_shape)
        self.frames = f

    def chunk(self) -> dict[str, Any]:
        return {
            "y": self.y,
            "audio": AudioConditioning(
                features=torch.randn(self.feature_shape, generator=self.gen),
                speaking=torch.ones(1, 1, self.frames, dtype=torch.bool),
            ),
            "noise": torch.randn(self.noise_shape, generator=self.gen),
        }


def _timed_chunk(engine: StreamingDiT, state: SessionState, index: int, inputs: dict[str, Any]) -> float:
    start = time.perf_counter()
    x0 = engine.denoise_chunk(state, index, **inputs)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(x0).all():
        raise RuntimeError(f"chunk {index} produced non-finite latents")
    return elapsed


def _allocations(engine: StreamingDiT, state: SessionState, index: int, inputs: dict[str, Any]) -> dict:
    """Ops that allocated CPU memory while denoising chunk `index`, and their bytes, per denoising pass."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        engine.denoise_chunk(state, index, **inputs)
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    passes = engine.passes_per_chunk
    return {"count_per_step": len(sizes) / passes, "bytes_per_step": sum(sizes) / passes}


def run(preset: str, height: int, width: int, chunks: int, target: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = WanModel(get_model_preset(preset))
    # Random head and audio k/v so every path computes something non-trivial.
    model.init_weights(zero_head=False, zero_audio=False)
    model.eval().requires_grad_(False)
    stream = StreamConfig(height=height, width=width, position_mode="window", cache_mode="per-step")
    engine = StreamingDiT(model, stream)
    half = repeats // 2
    window = range(target - half, target - half + repeats)
    if chunks <= window[-1]:
        raise ValueError(f"--chunks {chunks} must exceed the last timed chunk {window[-1]}")

    warm_inputs = _Inputs(engine, seed=1)
    warm = engine.open_session(warm_inputs.context, warm_inputs.clip)
    for i in range(3):
        _timed_chunk(engine, warm, i, warm_inputs.chunk())
    engine.close_session(warm)

    long_inputs = _Inputs(engine, seed=2)
    long = engine.open_session(long_inputs.context, long_inputs.clip)
    times: list[float] = []
    chunk2_times: list[float] = []
    target_times: list[float] = []
    bytes_at: dict[int, int] = {}
    for i in range(chunks):
        if i in window:
            short_inputs = _Inputs(engine, seed=100 + i)
            short = engine.open_session(short_inputs.context, short_inputs.clip)
            for j in range(2):
                _timed_chunk(engine, short, j, short_inputs.chunk())
            chunk2_times.append(_timed_chunk(engine, short, 2, short_inputs.chunk()))
            engine.close_session(short)
        elapsed = _timed_chunk(engine, long, i, long_inputs.chunk())
        times.append(elapsed)
        if i in window:
            target_times.append(elapsed)
        if i in (2, target):
            bytes_at[i] = _session_bytes(long)
    late = chunks
    allocations = {f"chunk_{late}": _allocations(engine, long, late, long_inputs.chunk())}
    engine.close_session(long)
    short_inputs = _Inputs(engine, seed=99)
    short = engine.open_session(short_inputs.context, short_inputs.clip)
    for j in range(2):
        _timed_chunk(engine, short, j, short_inputs.chunk())
    allocations = {"chunk_2": _allocations(engine, short, 2, short_inputs.chunk()), **allocations}
    engine.close_session(short)

    t2 = statistics.median(chunk2_times)
    tn = statistics.median(target_times)
    return {
        "preset": preset,
        "resolution": {"height": height, "width": width, "tokens_per_chunk": stream.tokens_per_chunk},
        "stream": {
            "chunk_latent_frames": stream.chunk_latent_frames,
            "denoising_steps": list(stream.denoising_steps),
            "cache_mode": stream.cache_mode,
            "position_mode": stream.position_mode,
            "train_latent_frames": stream.train_latent_frames,
            "forwards_per_chunk": engine.passes_per_chunk,
            "audio": "1 speaking character",
        },
        "chunks_run": chunks,
        "method": (
            f"chunk {target}: median of the long session's chunks {window[0]}..{window[-1]}; chunk 2: median "
            f"of {repeats} fresh sessions' chunk 2, run interleaved with those chunks; memory: storage bytes "
            "of all session tensors (self-attn cache + cross-attn K/V) of the long session"
        ),
        "time_s": {
            "chunk_2_median": t2,
            f"chunk_{target}_median": tn,
            "chunk_2_samples": chunk2_times,
            f"chunk_{target}_samples": target_times,
            "all_chunks_long_session_ms": [round(t * 1e3, 2) for t in times],
        },
        "cache_bytes": {"chunk_2": bytes_at[2], f"chunk_{target}": bytes_at[target]},
        "allocations_per_step": allocations,
        "ratios": {
            f"time_chunk{target}_over_chunk2": tn / t2,
            f"memory_chunk{target}_over_chunk2": bytes_at[target] / bytes_at[2],
            f"allocation_bytes_chunk{late}_over_chunk2": allocations[f"chunk_{late}"]["bytes_per_step"]
            / allocations["chunk_2"]["bytes_per_step"],
        },
        "targets": {"time_ratio_max": 1.05, "memory_ratio": 1.0, "allocations": "flat"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=206, help="chunks of the long session")
    parser.add_argument("--target", type=int, default=200, help="the late chunk compared with chunk 2")
    parser.add_argument("--repeats", type=int, default=9, help="timed samples per median")
    args = parser.parse_args(argv)
    result = run(args.preset, args.height, args.width, args.chunks, args.target, args.repeats)
    document = {
        "benchmark": "dit_cache",
        **provenance("benchmarks.dit_cache", argv),
        "torch_threads": 1,
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    medians = {k: v for k, v in result["time_s"].items() if "median" in k}
    summary = {"time_s": medians, **result["ratios"], "cache_bytes": result["cache_bytes"]}
    print(json.dumps({**summary, "allocations_per_step": result["allocations_per_step"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

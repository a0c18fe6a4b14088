"""Streaming VAE decode benchmark: time per chunk and peak memory of a preset on this machine, plus FLOPs.

    python -m benchmarks.vae_decode --out benchmarks/results/vae_decode_cpu.json

Decodes a stream of random latent chunks (3 latents each; 9 frames for the first chunk, 12 after) through a
`DecodeSession` with random weights (timing does not depend on the values) and records wall time per chunk,
the session's cache size and the process's peak resident memory. The same latents are decoded both ways a
session can, chunk by chunk in turn: `decode` one decoder call per latent (Wan's loop, the default) and
`decode_chunk_at_once` one call per chunk; `chunk_at_once_vs_per_latent` records how far their frames
differ. The peak resident memory is the process's, both sessions included. FLOPs per chunk come from
`decoder.inspect.describe_vae` (meta-device count) for the benchmarked preset and size and for `wan2.1` at
512x512.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import provenance
from decoder.inspect import describe_vae
from decoder.streaming import DecodeSession, frames_to_uint8
from decoder.vae import build_vae
from proto.vae_config import get_vae_preset

CHUNK_LATENTS = 3
FPS = 16


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _record(
    session: DecodeSession, seconds: list[float], frames: list[int], preset: str, threads: int
) -> dict[str, Any]:
    cfg = session.vae.cfg
    later = seconds[1:]
    info = describe_vae(preset, session.height, session.width)
    later_median = statistics.median(later) if later else None
    return {
        "preset": preset,
        "height": session.height,
        "width": session.width,
        "dtype": "float32",
        "device": "cpu",
        "chunk_at_once": session.chunk_at_once,
        "torch_threads": threads,
        "chunks": len(seconds),
        "frames_per_chunk": frames,
        "seconds_per_chunk": [round(s, 5) for s in seconds],
        "first_chunk_seconds": round(seconds[0], 5),
        "later_chunk_seconds_median": None if later_median is None else round(later_median, 5),
        "later_chunk_seconds_min": None if not later else round(min(later), 5),
        "realtime_factor_later_chunk": None
        if later_median is None
        else round((CHUNK_LATENTS * cfg.temporal_stride / FPS) / later_median, 3),
        "decode_flops_per_chunk": info["decode_flops"],
        "achieved_gflops_later_chunk": None
        if later_median is None
        else round(info["decode_flops"]["later_chunk"] / later_median / 1e9, 3),
        "session_cache_bytes": session.cache_nbytes(),
    }


def run(preset: str, height: int, width: int, chunks: int, threads: int, seed: int) -> dict[str, Any]:
    """Per-latent (the default) and chunk-at-once sessions decode the same chunks, taking turns going first
    (the load of the shared machine and the allocator's state then weigh on both alike)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = get_vae_preset(preset)
    vae = build_vae(cfg)
    sessions = {
        "decode": DecodeSession(vae, height, width, chunk_at_once=False),
        "decode_chunk_at_once": DecodeSession(vae, height, width, chunk_at_once=True),
    }
    lat_h, lat_w = sessions["decode"].latent_size
    latents = [torch.randn(cfg.z_dim, CHUNK_LATENTS, lat_h, lat_w) for _ in range(chunks)]
    rss_before = _peak_rss_bytes()
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    frames: dict[str, list[int]] = {name: [] for name in sessions}
    videos: dict[str, list[torch.Tensor]] = {name: [] for name in sessions}
    for index, chunk in enumerate(latents):
        for name in sorted(sessions, reverse=bool(index % 2)):
            start = time.perf_counter()
            video = sessions[name].decode_latents(chunk)  # decode_chunk's work, keeping the float frames
            out = frames_to_uint8(video)
            seconds[name].append(time.perf_counter() - start)
            frames[name].append(out.shape[0])
            videos[name].append(video)
    result: dict[str, Any] = {
        name: _record(session, seconds[name], frames[name], preset, threads)
        for name, session in sessions.items()
    }
    result["chunk_at_once_vs_per_latent"] = differences(videos["decode_chunk_at_once"], videos["decode"])
    # One process decodes both streams: its peak counts both sessions' caches.
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["peak_rss_increase_during_decode_bytes"] = _peak_rss_bytes() - rss_before
    return result


def differences(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """Max abs difference of two decodes' float frames, and of their uint8 frames (levels, pixel share)."""
    video_a, video_b = torch.cat(a, dim=2), torch.cat(b, dim=2)
    levels = (frames_to_uint8(video_a).int() - frames_to_uint8(video_b).int()).abs()
    return {
        "max_abs_float": float((video_a - video_b).abs().max()),
        "max_levels_uint8": int(levels.max()),
        "share_of_uint8_values_differing": float((levels > 0).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the CI box has 2 shared cores)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = {
        "benchmark": "vae_decode",
        **provenance("benchmarks.vae_decode", argv),
        **run(args.preset, args.height, args.width, args.chunks, args.threads, args.seed),
        "wan2.1_at_512x512": {
            key: value
            for key, value in describe_vae("wan2.1", 512, 512).items()
            if key in ("parameters", "decode_flops", "encode_flops", "decode_cache", "frames_per_chunk")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("decode", "decode_chunk_at_once"):
        d = result[name]
        print(
            f"{name}: {d['preset']} {d['height']}x{d['width']}, {d['torch_threads']} thread(s): "
            f"first chunk {d['first_chunk_seconds']:.3f} s, "
            f"later chunks median {d['later_chunk_seconds_median']} s"
        )
    print(
        f"chunk at once vs per latent: {result['chunk_at_once_vs_per_latent']}; "
        f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB; wrote {args.out}"
    )


if __name__ == "__main__":
    main()

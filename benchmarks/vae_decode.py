"""Streaming VAE decode benchmark: time per chunk and peak memory of a preset on this machine, plus FLOPs.

    python -m benchmarks.vae_decode --out benchmarks/results/vae_decode_cpu.json

Decodes a stream of random latent chunks (3 latents each; 9 frames for the first chunk, 12 after) through a
`DecodeSession` with random weights (timing does not depend on the values) and records wall time per chunk,
the session's cache size and the process's peak resident memory. FLOPs per chunk come from
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
from decoder.streaming import DecodeSession
from decoder.vae import build_vae
from proto.vae_config import get_vae_preset

CHUNK_LATENTS = 3
FPS = 16




def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(preset: str, height: int, width: int, chunks: int, threads: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = get_vae_preset(preset)
    vae = build_vae(cfg)
    session = DecodeSession(vae, height, width)
    lat_h, lat_w = session.latent_size
    latents = [torch.randn(cfg.z_dim, CHUNK_LATENTS, lat_h, lat_w) for _ in range(chunks)]
    rss_before = _peak_rss_bytes()
    seconds, frames = [], []
    for chunk in latents:
        start = time.perf_counter()
        out = session.decode_chunk(chunk)
        seconds.append(time.perf_counter() - start)
        frames.append(out.shape[0])
    later = seconds[1:]
    info = describe_vae(preset, height, width)
    later_median = statistics.median(later) if later else None
    return {
        "preset": preset,
        "height": height,
        "width": width,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": threads,
        "chunks": chunks,
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
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_increase_during_decode_bytes": _peak_rss_bytes() - rss_before,
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
        "decode": run(args.preset, args.height, args.width, args.chunks, args.threads, args.seed),
        "wan2.1_at_512x512": {
            key: value
            for key, value in describe_vae("wan2.1", 512, 512).items()
            if key in ("parameters", "decode_flops", "encode_flops", "decode_cache", "frames_per_chunk")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    d = result["decode"]
    print(
        f"{d['preset']} {d['height']}x{d['width']}, {d['torch_threads']} thread(s): "
        f"first chunk {d['first_chunk_seconds']:.3f} s, "
        f"later chunks median {d['later_chunk_seconds_median']} s, "
        f"peak RSS {d['peak_rss_bytes'] / 1e6:.0f} MB; wrote {args.out}"
    )


if __name__ == "__main__":
    main()

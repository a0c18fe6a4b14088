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

`--decoders wan2.1,taew2.1` adds the fast decoder (`--vae-decoder taew2.1`, `decoder.taehv`, seeded random
weights) on the same latents, both ways (`taew2.1_decode`, `taew2.1_decode_chunk_at_once`), and
`taew2.1_speedup_later_chunk`: the Wan VAE's median later-chunk time over taew2.1's, per mode (wall
clock; `..._cpu_time`: the same with process CPU time, which a busy shared host distorts less). `--decoders
taew2.1` times the fast decoder alone (sizes where the Wan VAE is too slow to wait for). `--device cuda`
and `--autocast bfloat16` time on a GPU (the device is synchronised before each chunk's clock stops; the
peak is then torch.cuda.max_memory_allocated).

    python -m benchmarks.vae_decode --preset wan2.1 --height 64 --width 64 --chunks 4 \
        --decoders wan2.1,taew2.1 --out benchmarks/results/vae_decode_taew2_1_cpu.json
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
from decoder.inspect import _FlopCounter, describe_vae
from decoder.streaming import DecodeSession, frames_to_uint8
from decoder.taehv import TEMPORAL_STRIDE, TAEHVSession, TAEHVState, build_taehv
from decoder.vae import build_vae
from proto.vae_config import get_vae_preset

CHUNK_LATENTS = 3
FPS = 16


DECODERS = ("wan2.1", "taew2.1")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timing(seconds: list[float], frames: list[int], threads: int) -> dict[str, Any]:
    later = seconds[1:]
    later_median = statistics.median(later) if later else None
    return {
        "torch_threads": threads,
        "chunks": len(seconds),
        "frames_per_chunk": frames,
        "seconds_per_chunk": [round(s, 5) for s in seconds],
        "first_chunk_seconds": round(seconds[0], 5),
        "later_chunk_seconds_median": None if later_median is None else round(later_median, 5),
        "later_chunk_seconds_min": None if not later else round(min(later), 5),
        "realtime_factor_later_chunk": None
        if later_median is None
        else round((CHUNK_LATENTS * TEMPORAL_STRIDE / FPS) / later_median, 3),
    }


def taehv_flops_per_chunk(height: int, width: int) -> int:
    """Convolution FLOPs of taew2.1 decoding one 3-latent chunk (meta device; multiply-add = 2)."""
    model = build_taehv(device="meta")
    counter = _FlopCounter(model)
    latent = torch.empty(CHUNK_LATENTS, 16, height // 8, width // 8, device="meta")
    model.decode_step(latent, TAEHVState())
    counter.remove()
    return counter.take()


def _record_taehv(
    session: TAEHVSession, seconds: list[float], frames: list[int], threads: int
) -> dict[str, Any]:
    timing = _timing(seconds, frames, threads)
    flops = taehv_flops_per_chunk(session.height, session.width)
    later = timing["later_chunk_seconds_median"]
    return {
        "decoder": "taew2.1",
        "parameters": sum(p.numel() for p in session.model.parameters()),
        "height": session.height,
        "width": session.width,
        "dtype": str(session.autocast_dtype or torch.float32).removeprefix("torch."),
        "device": session.device.type,
        "chunk_at_once": session.chunk_at_once,
        **timing,
        "decode_flops_per_chunk": flops,
        "achieved_gflops_later_chunk": None if later is None else round(flops / later / 1e9, 3),
        "session_cache_bytes": session.cache_nbytes(),
    }


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
        "dtype": str(session.autocast_dtype or torch.float32).removeprefix("torch."),
        "device": session.device.type,
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


def run(
    preset: str,
    height: int,
    width: int,
    chunks: int,
    threads: int,
    seed: int,
    decoders: tuple[str, ...] = ("wan2.1",),
    device: str = "cpu",
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Per-latent (the default) and chunk-at-once sessions of each decoder decode the same chunks, taking
    turns going first (the load of the shared machine and the allocator's state then weigh on all alike)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = get_vae_preset(preset)
    on = torch.device(device)
    sessions: dict[str, DecodeSession | TAEHVSession] = {}
    if "wan2.1" in decoders:
        vae = build_vae(cfg).to(on)
        for name, at_once in (("decode", False), ("decode_chunk_at_once", True)):
            sessions[name] = DecodeSession(vae, height, width, chunk_at_once=at_once, autocast_dtype=autocast)
    if "taew2.1" in decoders:
        fast = build_taehv(seed=seed, device=on)
        for name, at_once in (("taew2.1_decode", False), ("taew2.1_decode_chunk_at_once", True)):
            sessions[name] = TAEHVSession(fast, height, width, chunk_at_once=at_once, autocast_dtype=autocast)
    lat_h, lat_w = next(iter(sessions.values())).latent_size
    latents = [torch.randn(cfg.z_dim, CHUNK_LATENTS, lat_h, lat_w).to(on) for _ in range(chunks)]
    rss_before = _peak_rss_bytes()
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}  # process CPU time: robust to a busy host
    frames: dict[str, list[int]] = {name: [] for name in sessions}
    videos: dict[str, list[torch.Tensor]] = {name: [] for name in sessions}
    for index, chunk in enumerate(latents):
        for name in sorted(sessions, reverse=bool(index % 2)):
            if on.type == "cuda":
                torch.cuda.synchronize(on)
            start, cpu_start = time.perf_counter(), time.process_time()
            video = sessions[name].decode_latents(chunk)  # decode_chunk's work, keeping the float frames
            out = frames_to_uint8(video)
            if on.type == "cuda":
                torch.cuda.synchronize(on)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            frames[name].append(out.shape[0])
            videos[name].append(video.float().cpu())
    result: dict[str, Any] = {}
    for name, session in sessions.items():
        if isinstance(session, TAEHVSession):
            result[name] = _record_taehv(session, seconds[name], frames[name], threads)
        else:
            result[name] = _record(session, seconds[name], frames[name], preset, threads)
        result[name]["cpu_seconds_per_chunk"] = [round(c, 5) for c in cpu[name]]
        result[name]["later_chunk_cpu_seconds_median"] = (
            round(statistics.median(cpu[name][1:]), 5) if len(cpu[name]) > 1 else None
        )
    for prefix in ("", "taew2.1_"):
        if f"{prefix}decode" in videos:
            result[f"{prefix}chunk_at_once_vs_per_latent"] = differences(
                videos[f"{prefix}decode_chunk_at_once"], videos[f"{prefix}decode"]
            )
    if "decode" in result and "taew2.1_decode" in result:
        result["taew2.1_speedup_later_chunk"] = {
            mode: _ratio(
                result[mode]["later_chunk_seconds_median"],
                result[f"taew2.1_{mode}"]["later_chunk_seconds_median"],
            )
            for mode in ("decode", "decode_chunk_at_once")
        }
        result["taew2.1_speedup_later_chunk_cpu_time"] = {
            mode: _ratio(
                result[mode]["later_chunk_cpu_seconds_median"],
                result[f"taew2.1_{mode}"]["later_chunk_cpu_seconds_median"],
            )
            for mode in ("decode", "decode_chunk_at_once")
        }
    # One process decodes every stream: its peak counts all sessions' caches.
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["peak_rss_increase_during_decode_bytes"] = _peak_rss_bytes() - rss_before
    if on.type == "cuda":
        result["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(on)
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


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
    parser.add_argument(
        "--decoders",
        default="wan2.1",
        help=f"comma-separated, of {', '.join(DECODERS)}: the Wan VAE of --preset, the taew2.1 fast decoder",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--autocast", choices=("none", "bfloat16"), default="none", help="decode under autocast (GPU)"
    )
    args = parser.parse_args(argv)
    decoders = tuple(d.strip() for d in args.decoders.split(",") if d.strip())
    if not decoders or any(d not in DECODERS for d in decoders):
        parser.error(
            f"--decoders takes a comma-separated list of {', '.join(DECODERS)}, got {args.decoders!r}"
        )
    autocast = torch.bfloat16 if args.autocast == "bfloat16" else None
    result = {
        "benchmark": "vae_decode",
        **provenance("benchmarks.vae_decode", argv),
        **run(
            args.preset,
            args.height,
            args.width,
            args.chunks,
            args.threads,
            args.seed,
            decoders,
            args.device,
            autocast,
        ),
        "wan2.1_at_512x512": {
            key: value
            for key, value in describe_vae("wan2.1", 512, 512).items()
            if key in ("parameters", "decode_flops", "encode_flops", "decode_cache", "frames_per_chunk")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("decode", "decode_chunk_at_once", "taew2.1_decode", "taew2.1_decode_chunk_at_once"):
        if name not in result:
            continue
        d = result[name]
        print(
            f"{name}: {d.get('preset', 'taew2.1')} {d['height']}x{d['width']} on {d['device']} "
            f"({d['dtype']}), {d['torch_threads']} thread(s): first chunk {d['first_chunk_seconds']:.3f} s, "
            f"later chunks median {d['later_chunk_seconds_median']} s"
        )
    for prefix in ("", "taew2.1_"):
        if f"{prefix}chunk_at_once_vs_per_latent" in result:
            print(f"{prefix}chunk at once vs per latent: {result[f'{prefix}chunk_at_once_vs_per_latent']}")
    if "taew2.1_speedup_later_chunk" in result:
        print(f"taew2.1 speed-up over the Wan VAE (later chunks): {result['taew2.1_speedup_later_chunk']}")
    print(f"peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()

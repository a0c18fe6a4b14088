"""The FP8 quality guard: the same chunks denoised with and without FP8, and how far the latents move.

    python -m workers.fp8_check --preset tiny --resolution 64x64 --chunks 3 --json /tmp/fp8_check.json

One score rank (``workers.score_rank.ScoreRank``, the object serving uses) streams ``--chunks`` chunks from
fixed inputs (seeded random text/CLIP features, audio, I2V conditioning and per-chunk noise seeds) twice
over the same weights: the reference in ``--dtype`` (bfloat16 on CUDA, float32 on CPU by default) with the
cache in that dtype, then the FP8 run: the model converted in place (``--fp8 linear``, default) and/or the
cache stored in e4m3 (``--kv-cache-dtype fp8``). The FP8 matrix products are real (``torch._scaled_mm``)
where the device has them (CUDA, sm_89+) and emulated elsewhere (quantise-dequantise, float32 matmul:
``workers.fp8`` docstring); the report says which, and why. ``--mode scaled_mm`` insists on the real kernel.

Reported per chunk: the clean latent's max |Δ|, the relative L2 ‖x_fp8 − x_ref‖ / ‖x_ref‖ and the
reference's max |x|; per converted layer (``--per-layer``): the relative L2 of the FP8 layer against the
high-precision one on the reference run's first input to it (each layer's own quantisation error, before
errors accumulate across blocks); the weights' and the cache's bytes; and, per run, the mean wall time per
forward over the chunks after the first two (``--chunks`` >= 3; a benchmark figure, synchronised on CUDA).
Text on stdout, the same numbers as JSON with ``--json PATH``.

The weights are seeded random (``workers.factory.build_score_model``) unless ``--checkpoint FILE`` (a DiT
state dict) is given, so the figures describe the numerics of the format on this architecture, not the
quality of a trained model's video.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proto.chunk_specs import chunk_request_specs, chunk_seed, session_open_specs
from proto.model_config import get_model_preset, model_preset_names
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest, SessionOpen
from workers.factory import build_score_model
from workers.fp8 import (
    FP8_CHOICES,
    KV_CACHE_DTYPES,
    Fp8Linear,
    convert_to_fp8,
    fp8_supported,
    granularity_for,
    is_fp8_layer,
)
from workers.score_rank import ScoreRank

Inputs = tuple[dict[str, torch.Tensor], list[tuple[ChunkRequest, dict[str, torch.Tensor]]]]


def make_inputs(preset: str, stream: StreamConfig, chunks: int, seed: int) -> Inputs:
    """Seeded float32 CPU inputs of one session: the SessionOpen tensors and ``chunks`` chunk requests (one
    character speaking throughout, full-frame face box)."""
    config = get_model_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    opened = {s.name: torch.randn(s.shape, generator=gen) for s in session_open_specs(config, 1)}
    if "face_boxes" in opened:
        opened["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    requests = []
    for index in range(chunks):
        specs = chunk_request_specs(config, stream, 1, index)
        tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
        speaking = ((True,) * stream.frames_in_chunk(index),)
        requests.append((ChunkRequest("check", index, speaking, chunk_seed(seed, index), specs), tensors))
    return opened, requests


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_chunks(
    model: nn.Module, stream: StreamConfig, inputs: Inputs, kv_cache_dtype: str
) -> tuple[list[torch.Tensor], list[float], int, int]:
    """Denoise the session's chunks on one ``ScoreRank``: (latents on the CPU, float32; wall seconds per
    chunk; cache bytes; passes per chunk)."""
    rank = ScoreRank(model, stream, kv_cache_dtype=kv_cache_dtype)
    opened, requests = inputs
    config = rank.config
    rank.open_session(
        SessionOpen("check", stream.latent_height, stream.latent_width, 1, session_open_specs(config, 1)),
        opened,
    )
    latents, seconds = [], []
    for msg, tensors in requests:
        _sync(rank.device)
        start = time.perf_counter()
        x0 = rank.denoise(msg, tensors)
        _sync(rank.device)
        seconds.append(time.perf_counter() - start)
        assert x0 is not None
        latents.append(x0.float().cpu())
    cache_bytes = rank.sessions["check"].state.cache.nbytes
    return latents, seconds, cache_bytes, rank.engine.passes_per_chunk


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def layer_errors(model: nn.Module, run: Any, mode: str, granularity: str) -> dict[str, float]:
    """Each FP8 layer's own error: during ``run()`` (a reference pass), the first call of every layer
    ``convert_to_fp8`` would convert is repeated with an ``Fp8Linear`` made from it, and the relative L2 of
    its output against the layer's is recorded."""
    errors: dict[str, float] = {}
    hooks = []

    def hook(name: str):
        def measure(module: nn.Linear, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if name not in errors:
                fp8 = Fp8Linear.from_linear(module, granularity, mode)  # type: ignore[arg-type]
                errors[name] = _rel_l2(fp8(args[0]), out)

        return measure

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_fp8_layer(name):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return errors


def resolve_mode(choice: str, device: torch.device) -> tuple[str, str]:
    """(``scaled_mm`` or ``emulate``, why) for ``--mode``: auto = the real kernel where the device has it."""
    ok, reason = fp8_supported(device)
    if choice == "emulate":
        return "emulate", "emulated by request (--mode emulate)"
    if choice == "scaled_mm" and not ok:
        raise ValueError(f"--mode scaled_mm needs FP8 matrix products: {reason}; use --mode auto or emulate")
    if ok:
        return "scaled_mm", f"real FP8 matrix products (torch._scaled_mm) on {reason}"
    return "emulate", f"emulated (quantise-dequantise, float32 matmul): {reason}"


def check(
    preset: str,
    height: int,
    width: int,
    *,
    chunks: int = 2,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    fp8: str = "linear",
    kv_cache_dtype: str = "auto",
    mode: str = "auto",
    checkpoint: str | None = None,
    per_layer: bool = False,
) -> dict[str, Any]:
    """Run the reference and the FP8 stream (module docstring); the report as a JSON-able dict."""
    if fp8 not in FP8_CHOICES or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--fp8 must be in {FP8_CHOICES}, --kv-cache-dtype in {KV_CACHE_DTYPES}")
    if fp8 == "off" and kv_cache_dtype == "auto":
        raise ValueError("nothing to check: pass --fp8 linear and/or --kv-cache-dtype fp8")
    if chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {chunks}")
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    config = get_model_preset(preset)
    overrides: dict[str, Any] = {"height": height, "width": width}
    if steps is not None:
        # as run/serve's --steps (server.options.evenly_spaced_steps): 1000, 1000 - 1000/N, ...
        overrides["denoising_steps"] = tuple(
            sorted({round(1000 - 1000 * i / steps) for i in range(steps)})[::-1]
        )
    stream = StreamConfig.for_schedule(config.stream_schedule, **overrides)
    inputs = make_inputs(preset, stream, chunks, seed)
    resolved, why = resolve_mode(mode, dev) if fp8 == "linear" else ("off", "no FP8 matrix products")
    granularity = granularity_for(dev) if resolved == "scaled_mm" else "row"
    if resolved == "scaled_mm" and torch_dtype != torch.bfloat16:
        raise ValueError(
            f"real FP8 matrix products write bfloat16: use --dtype bfloat16 (or auto), not {dtype}"
        )

    model = build_score_model(preset, checkpoint, seed=seed, dtype=torch_dtype, device=dev)
    ref_bytes = _weight_bytes(model)
    result: dict[str, Any] = {}

    def reference() -> None:
        result["ref"] = stream_chunks(model, stream, inputs, "auto")

    with torch.no_grad():
        errors = (
            layer_errors(model, reference, resolved, granularity) if per_layer and fp8 == "linear" else {}
        )
        if "ref" not in result:
            reference()
        converted: list[str] = []
        if fp8 == "linear":
            converted = convert_to_fp8(model, mode=resolved, granularity=granularity).converted  # type: ignore[arg-type]
        got = stream_chunks(model, stream, inputs, kv_cache_dtype)
    ref = result["ref"]
    per_chunk = [
        {
            "chunk": i,
            "max_abs": float((g - w).abs().max()),
            "rel_l2": _rel_l2(g, w),
            "ref_max_abs": float(w.abs().max()),
        }
        for i, (g, w) in enumerate(zip(got[0], ref[0], strict=True))
    ]

    def per_forward_ms(seconds: list[float], passes: int) -> float | None:
        steady = seconds[2:]
        return None if not steady else 1000 * sum(steady) / len(steady) / passes

    return {
        "preset": preset,
        "resolution": f"{height}x{width}",
        "device": str(dev),
        "dtype": dtype,
        "chunks": chunks,
        "steps": list(stream.denoising_steps),
        "weights": checkpoint or f"seeded random (seed {seed})",
        "fp8": fp8,
        "kv_cache_dtype": kv_cache_dtype,
        "fp8_mode": resolved,
        "fp8_mode_reason": why,
        "granularity": granularity if fp8 == "linear" else None,
        "converted_layers": len(converted),
        "per_chunk": per_chunk,
        "max_abs": max(c["max_abs"] for c in per_chunk),
        "rel_l2": max(c["rel_l2"] for c in per_chunk),
        "per_layer_rel_l2": errors,
        "weight_bytes": {"reference": ref_bytes, "fp8": _weight_bytes(model)},
        "kv_cache_bytes": {"reference": ref[2], "fp8": got[2]},
        "per_forward_ms": {
            "reference": per_forward_ms(ref[1], ref[3]),
            "fp8": per_forward_ms(got[1], got[3]),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"fp8_check: {report['preset']} {report['resolution']} on {report['device']}, "
        f"reference {report['dtype']}, "
        f"{report['chunks']} chunk(s), steps {report['steps']}, weights {report['weights']}",
    ]
    if report["fp8"] == "linear":
        lines.append(
            f"  FP8: --fp8 linear ({report['fp8_mode_reason']}; {report['converted_layers']} layers, "
            f"{report['granularity']} scales), --kv-cache-dtype {report['kv_cache_dtype']}"
        )
    else:
        lines.append(f"  FP8: --fp8 off, --kv-cache-dtype {report['kv_cache_dtype']}")
    for c in report["per_chunk"]:
        lines.append(
            f"  chunk {c['chunk']}: latent max |d| {c['max_abs']:.3e}, relative L2 {c['rel_l2']:.3e} "
            f"(reference max |x| {c['ref_max_abs']:.3g})"
        )
    if report["per_layer_rel_l2"]:
        worst = sorted(report["per_layer_rel_l2"].items(), key=lambda kv: -kv[1])
        lines.append("  per layer (own error, relative L2), worst first:")
        lines += [f"    {name}: {err:.3e}" for name, err in worst[:12]]
    w, kv, ms = report["weight_bytes"], report["kv_cache_bytes"], report["per_forward_ms"]
    lines.append(
        f"  weights {w['reference']:,} -> {w['fp8']:,} B; KV cache {kv['reference']:,} -> {kv['fp8']:,} B"
    )
    if ms["reference"] is not None:
        lines.append(
            f"  per forward (chunks >= 2): reference {ms['reference']:.2f} ms, FP8 {ms['fp8']:.2f} ms"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.fp8_check", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=model_preset_names())
    parser.add_argument(
        "--resolution", default="64x64", help="HxW (or N for NxN) in pixels, multiples of 16 (default 64x64)"
    )
    parser.add_argument(
        "--chunks", type=int, default=2, help="chunks to stream (>= 3 for a per-forward time)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="N evenly spaced steps (default: the schedule's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="inputs, noise and random-weight seed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="the reference's dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--fp8", choices=FP8_CHOICES, default="linear", help="FP8 linear layers (default linear)"
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="the FP8 run's cache"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "scaled_mm", "emulate"),
        default="auto",
        help="auto: torch._scaled_mm where the device has FP8 matrix products, else emulated",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="DiT state dict file (default: seeded random weights)"
    )
    parser.add_argument("--per-layer", action="store_true", help="also each layer's own FP8 error")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the report as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = [int(v) for v in args.resolution.lower().split("x")]
        height, width = sizes if len(sizes) == 2 else (sizes[0], sizes[0]) if len(sizes) == 1 else (0, 0)
    except ValueError:
        height = width = 0
    if height <= 0 or width <= 0:
        parser.error(f"--resolution must be HxW or N (square), e.g. 64x64, got {args.resolution!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = check(
            args.preset,
            height,
            width,
            chunks=args.chunks,
            steps=args.steps,
            seed=args.seed,
            device=device,
            dtype=args.dtype,
            fp8=args.fp8,
            kv_cache_dtype=args.kv_cache_dtype,
            mode=args.mode,
            checkpoint=args.checkpoint,
            per_layer=args.per_layer,
        )
    except ValueError as exc:
        print(f"fp8_check: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

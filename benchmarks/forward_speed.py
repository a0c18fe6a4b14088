"""Per-forward time of one streaming DiT pass, for each way of running it (attention backend, torch.compile,
CUDA graphs, and later FP8).

    python -m benchmarks.forward_speed --preset talkingmachines-18b --resolution 512 --dtype bf16 \\
        --device cuda --out /tmp/forward_speed.json
    python -m benchmarks.forward_speed --preset tiny --resolution 64x64 --dtype fp32 --device cpu \\
        --out /tmp/forward_speed_cpu.json                               # the CPU smoke run: seconds

What is timed: `StreamingDiT._forward` of a steady-state chunk (chunk index 2 of the sparse-causal window:
it writes its keys/values into the cache and attends to c_0, c_{t−1} and itself; chunk 2 of LiveAct's
ConvKV window, an audio step with the null audio's keys/values), on seeded random weights, with the
preset's stream schedule at the given size, I2V conditioning and one speaking character's audio where
the model has them. The cache's contents do not change the work, so no chunk is denoised before. Each
variant builds its own engine on the same model, runs `--warmup` passes (compilation, CUDA-graph capture),
then `--iters` timed passes, each between two `torch.cuda.synchronize()` calls on CUDA; the JSON has every
sample and the median, mean, min and p90 in ms, and the largest difference of the variant's velocity from
the eager one's (a broken kernel or graph shows there, not just in the time).

Variants (`VARIANTS`, run in this order; `--variants` picks some): `eager` (attention `auto`, resolved and
recorded), one `attn-<backend>` per concrete attention backend, `cuda-graphs`, `compiled`,
`compiled+graphs`. A variant the device cannot run is written as skipped with the reason (a CUDA-only
kernel or CUDA graphs on a CPU, FlashAttention-3 off Hopper, a kernel that is not installed); one that
fails while running is written as failed with the error, and the others still run. The JSON is rewritten
after every variant, so a run cut short keeps what it measured.

FP8 (`fp8`, `fp8+compiled`, last in the table): the DiT's large linear layers converted to `Fp8Linear`
(`workers.fp8.convert_to_fp8`, as `--fp8 linear` does on a score rank) and timed, eager and compiled. The
conversion is in place (a copy of an 18B model would not fit beside it), so the FP8 variants run after
every other one, and where FP8 matrix products are missing (the CPU, a GPU below sm_89) they are skipped
with the reason. A `Variant` carries that as a `transform` (the model to time) and a `requires` check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import provenance
from benchmarks.ttbc import RUN_DTYPES, parse_resolution
from proto.model_config import InfiniteTalkAudioConfig, get_model_preset
from proto.stream_config import StreamConfig
from workers import attention as attn
from workers.audio import AudioConditioning
from workers.cuda_graphs import check_cuda_graphs
from workers.factory import build_score_model
from workers.fp8 import Fp8Linear, convert_to_fp8, fp8_supported, granularity_for
from workers.model import WanModel
from workers.streaming import SessionState, StreamingDiT

TIMED_CHUNK = 2  # the first steady-state chunk of both windows


@dataclass(frozen=True)
class Variant:
    """One way of running the pass.

    attention: a `--attention-backend` name (refused → skipped). transform: the model to time, from the
    benchmark's model (which later variants reuse: only the last variants may change it in place, as FP8
    does). requires: a skip reason for this device/dtype, or None.
    """

    name: str
    attention: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    transform: Callable[[WanModel], WanModel] | None = None
    requires: Callable[[torch.device, torch.dtype], str | None] | None = None


def _to_fp8(model: WanModel) -> WanModel:
    """The model with `--fp8 linear`'s layers, converted in place once (both FP8 variants time it)."""
    if not any(isinstance(m, Fp8Linear) for m in model.modules()):
        device = next(model.parameters()).device
        convert_to_fp8(model, mode="scaled_mm", granularity=granularity_for(device))
    return model


def _fp8_requires(device: torch.device, dtype: torch.dtype) -> str | None:
    ok, reason = fp8_supported(device)
    if not ok:
        return reason
    return None if dtype == torch.bfloat16 else f"--fp8 linear runs under bfloat16, not {dtype}"


VARIANTS: list[Variant] = [
    Variant("eager"),
    *(Variant(f"attn-{name}", attention=name) for name in attn.KERNELS),
    Variant("cuda-graphs", cuda_graphs=True),
    Variant("compiled", compile=True),
    Variant("compiled+graphs", compile=True, cuda_graphs=True),
    # Last: they convert the benchmark's model in place (module docstring).
    Variant("fp8", transform=_to_fp8, requires=_fp8_requires),
    Variant("fp8+compiled", compile=True, transform=_to_fp8, requires=_fp8_requires),
]


def variant_table() -> list[Variant]:
    """The variants in the order they run (`VARIANTS`)."""
    return list(VARIANTS)


def _skip_reason(variant: Variant, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why this device cannot run the variant (None: it can)."""
    try:
        attn.resolve_attention_backend(variant.attention, device, dtype, head_dim)
        if variant.cuda_graphs:
            check_cuda_graphs(device)
    except ValueError as exc:
        return str(exc)
    if variant.requires is not None:
        return variant.requires(device, dtype)
    return None


class _Pass:
    """One steady-state pass of an engine, ready to call repeatedly (module docstring)."""

    def __init__(self, engine: StreamingDiT, seed: int) -> None:
        model, stream = engine.model, engine.stream
        cfg = model.config
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

        clip = rand(cfg.clip_tokens, cfg.clip_dim) if cfg.has_image_branch else None
        self.state: SessionState = engine.open_session(rand(cfg.text_len, cfg.text_dim), clip)
        self.engine = engine
        c = TIMED_CHUNK
        shape = stream.latent_shape(c)
        self.x = rand(*shape)
        self.y = rand(cfg.in_dim - cfg.out_dim, *shape[1:]) if cfg.has_image_branch else None
        if engine.memory_window:
            self.rope_q, self.rope_k = engine.window_ropes(c, device)
            self.audio_kv = None
            if isinstance(cfg.audio, InfiniteTalkAudioConfig):
                self.audio_kv = engine._null_audio_kv_of(False, device)  # same shapes as real audio
            self.step = len(engine.timesteps) - 1  # an audio step
        else:
            audio = None
            if cfg.audio is not None:
                a = cfg.audio
                tokens = rand(1, 1, shape[1], a.num_tokens, a.token_dim, dt=dtype)
                audio = AudioConditioning(tokens=tokens)
            with torch.no_grad():
                self.inputs = engine.chunk_inputs(c, audio, device)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        engine, state, c = self.engine, self.state, TIMED_CHUNK
        if engine.memory_window:
            emb = state.time_emb[self.step]
            return engine._forward(
                state, self.x, self.step, c, self.y, self.rope_q, emb, self.audio_kv, key_rope=self.rope_k
            )
        return engine.step(state, self.x, 0, c, self.y, self.inputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(run: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(samples)
    return {
        "median": statistics.median(samples),
        "mean": statistics.fmean(samples),
        "min": ordered[0],
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "samples": [round(s, 4) for s in samples],
    }


def run_variant(
    variant: Variant,
    model: WanModel,
    stream: StreamConfig,
    warmup: int,
    iters: int,
    reference: torch.Tensor | None,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Time `variant`; (its JSON record, its velocity for the next variants' comparison)."""
    param = next(model.parameters())
    device, dtype, head_dim = param.device, param.dtype, model.config.head_dim
    record: dict[str, Any] = {
        "name": variant.name,
        "attention_requested": variant.attention,
        "compile": variant.compile,
        "cuda_graphs": variant.cuda_graphs,
    }
    reason = _skip_reason(variant, device, dtype, head_dim)
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}, None
    previous = attn.get_attention_backend()
    try:
        record["attention_backend"] = attn.configure_attention_backend(
            variant.attention, device, dtype, head_dim
        )
        timed_model = model if variant.transform is None else variant.transform(model)
        engine = StreamingDiT(timed_model, stream, compile=variant.compile, cuda_graphs=variant.cuda_graphs)
        one_pass = _Pass(engine, seed=0)
        start = time.perf_counter()
        out = one_pass().float()
        _sync(device)
        record["first_pass_s"] = time.perf_counter() - start  # compilation shows here
        record["ms"] = _time(one_pass, device, max(warmup - 1, 0), iters)
        out = one_pass().float()
        if engine.graphs is not None:
            record["graphs"] = engine.graphs.stats()
        if reference is not None:
            record["max_abs_diff_vs_eager"] = float((out - reference).abs().max())
        record["status"] = "ok"
        engine.close_session(one_pass.state)
        return record, out
    except Exception as exc:  # one variant failing must not lose the others
        return {**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}, None
    finally:
        attn.set_attention_backend(previous)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flash_attn": attn.flash_available(),
        "flash_attn_interface": attn.fa3_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["card"] = props.name
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.forward_speed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=parse_resolution, default=(64, 64), help="512 or HxW")
    parser.add_argument("--dtype", choices=tuple(RUN_DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="passes before timing (compile, capture)")
    parser.add_argument("--iters", type=int, default=20, help="timed passes per variant")
    parser.add_argument(
        "--variants", default="all", help="comma-separated names from the table, or all (default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on the CPU, steadier timings)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 2:
        parser.error("--warmup must be at least 2 (CUDA graphs run one eager pass, then capture)")
    table = variant_table()
    names = [v.name for v in table]
    chosen = names if args.variants == "all" else [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(names)}")
    device = torch.device(args.device)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    dtype = getattr(torch, RUN_DTYPES[args.dtype])
    height, width = args.resolution
    cfg = get_model_preset(args.preset)
    stream = StreamConfig.for_schedule(cfg.stream_schedule, height=height, width=width)
    model = build_score_model(args.preset, seed=args.seed, dtype=dtype, device=device)
    document: dict[str, Any] = {
        "benchmark": "forward_speed",
        **provenance("benchmarks.forward_speed", argv),
        "environment": _environment(device),
        "preset": args.preset,
        "resolution": {"height": height, "width": width},
        "dtype": RUN_DTYPES[args.dtype],
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "pass": {
            "window": stream.window,
            "chunk_index": TIMED_CHUNK,
            "latent_shape": list(stream.latent_shape(TIMED_CHUNK)),
            "tokens": stream.tokens_in_chunk(TIMED_CHUNK),
        },
        "warmup": args.warmup,
        "iters": args.iters,
        "variants": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reference = None
    for variant in table:
        if variant.name not in chosen:
            continue
        record, out = run_variant(variant, model, stream, args.warmup, args.iters, reference)
        if variant.name == "eager" and out is not None:
            reference = out
        document["variants"].append(record)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
        ms = record.get("ms", {}).get("median")
        what = f"{ms:.3f} ms" if ms is not None else f"{record['status']}: {record.get('reason', '')}"
        print(f"{variant.name:>16}  {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

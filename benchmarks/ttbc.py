"""The TTBC study: the server designs of §4.3 (Figure 3) and the chunk × steps ablation of §5.4 (Table 1).

Runs the real ``talkingmachines run`` pipeline once per case on the same synthetic inputs and seed: the
rank entry ``server.run_job:main`` (``server.master`` + ``workers.worker_loop``, the engine ``serve`` uses)
launched by ``server.launcher`` with plain ``run`` arguments — ``--chunk-frames``, ``--dtype``, and the rank
options ``--pin-cores`` (one core per rank) and ``--rank-report`` (each rank's peak memory, DiT forwards,
CPU and run-queue seconds, memory plan; ``server.rank_report``):

- case 1: self-contained 1 (``--decoder colocated --score-workers 1``): one device scores and decodes in turn;
- case 2: self-contained N with sequence parallelism (``--decoder colocated --score-workers N``);
- case 3: disaggregated 1+1 (``--decoder dedicated --score-workers 1``): score on one device, decode on
  another;
- case 4: disaggregated N+1 (``--decoder dedicated --score-workers N``).

TTBC (time between the ends of two consecutive chunk publishes) is taken from chunk ``1 + warmup`` on:
chunk 0 has no predecessor (its time is the first-chunk latency) and the ``warmup`` chunks after it still
allocate caches. The real-time line is a steady chunk's video duration (12 frames / 16 fps = 0.75 s at 3
latent frames per chunk).

Ablation (``--ablation``): chunk {3, 7} latent frames × steps {2, 4}, each run on the ablation case (3 when it
fits the devices, else 1), giving TTBC and the score devices each setting needs to stay real time at the
measured speed of one device (``devices_needed``; defined in benchmarks/README.md).

CPU mode (``--device cpu``): one torch thread per rank, rank ``r`` pinned to core ``r mod cores``; a case with
more ranks than cores is run anyway and flagged ``oversubscribed``. GPU mode (``--device cuda``): one GPU per
rank; cases needing more GPUs than are visible are skipped with the reason.

    python -m benchmarks.ttbc --preset tiny --cases 1,2,3,4 --chunks 12 --out benchmarks/results/ttbc_cpu \\
        --resolution 64x64 --steps 128 --ablation
    python -m benchmarks.ttbc --preset talkingmachines-18b --cases 1,2,3,4 --chunks 12 --out DIR \\
        --resolution 512 --dtype bf16 --device cuda --steps 2 --ablation   # results: benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.provenance import provenance
from benchmarks.stream_inputs import audio_samples_for_chunks, write_inputs
from engine.stats import STAGES
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.topology import Topology
from server.launcher import launch
from workers.sp import check_sp_shapes

# The study's dtype names -> ``run --dtype``.
RUN_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ABLATION_CHUNKS = (3, 7)
ABLATION_STEPS = (2, 4)
# Table 1 of the paper: H100s for the score model at (chunk latent frames, steps), one more for the VAE.
PAPER_SCORE_GPUS = {(7, 4): 4, (7, 2): 2, (3, 4): 2, (3, 2): 1}


@dataclass(frozen=True)
class Case:
    """One of the paper's four server designs, with ``score_workers`` score devices."""

    number: int
    label: str
    decoder: str
    score_workers: int

    @property
    def world_size(self) -> int:
        return self.score_workers + (1 if self.decoder == "dedicated" else 0)


def make_case(number: int, sp_degree: int) -> Case:
    """Case 1..4 of Figure 3; ``sp_degree`` is N of cases 2 and 4."""
    cases = {
        1: Case(1, "self-contained 1", "colocated", 1),
        2: Case(2, f"self-contained {sp_degree} (SP)", "colocated", sp_degree),
        3: Case(3, "disaggregated 1+1", "dedicated", 1),
        4: Case(4, f"disaggregated {sp_degree}+1", "dedicated", sp_degree),
    }
    if number not in cases:
        raise ValueError(f"case {number} does not exist; the cases are 1, 2, 3, 4 (Figure 3)")
    return cases[number]


# ---- statistics (pure functions of the per-chunk rows) ----------------------------------------------


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean and the sample count of ``values`` (seconds); None when empty."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "n": int(arr.size),
    }


def steady_rows(per_chunk: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """Rows of chunks ``1 + warmup`` on: chunk 0 has no TTBC, the next ``warmup`` chunks warm caches up."""
    return [row for row in per_chunk if row["chunk_index"] >= 1 + warmup]


def devices_needed(score_s: float, transfer_s: float, chunk_duration_s: float) -> dict[str, Any]:
    """Score devices to keep one stream real time, from one device's score time per chunk.

    With N score devices in sequence parallel (ideal scaling) a chunk's score path takes
    ``score_s / N + transfer_s``; real time needs it within ``chunk_duration_s``, so
    ``N = ceil(score_s / (chunk_duration_s − transfer_s))``. ``load`` is the unrounded ratio (how much of
    one device a stream uses). None when the transfer alone exceeds the chunk duration.
    """
    budget = chunk_duration_s - transfer_s
    if budget <= 0:
        return {"devices": None, "load": None, "budget_s": budget,
                "reason": "the transfer alone exceeds the chunk duration"}
    load = score_s / budget
    return {"devices": max(1, math.ceil(load)), "load": load, "budget_s": budget}


def summarise_case(
    per_chunk: list[dict[str, Any]],
    chunk_duration_s: float,
    warmup: int,
    forwards_per_chunk: float | None = None,
) -> dict[str, Any]:
    """TTBC distribution and stage breakdown of one run's steady chunks (``engine.stats`` rows)."""
    steady = steady_rows(per_chunk, warmup)
    ttbc = [row["ttbc_s"] for row in steady if row["ttbc_s"] is not None]
    stages = {name: percentiles([row[f"{name}_s"] for row in steady]) for name in STAGES}

    def p50(name: str) -> float:
        stat = stages[name]
        return stat["p50"] if stat is not None else float("nan")

    summary: dict[str, Any] = {
        "chunk_duration_s": chunk_duration_s,
        "first_chunk_latency_s": per_chunk[0]["published_at_s"] if per_chunk else None,
        "warmup_chunks": warmup,
        "ttbc_s": percentiles(ttbc),
        "fraction_under_line": (sum(t <= chunk_duration_s for t in ttbc) / len(ttbc)) if ttbc else None,
        "misses": sum(t > chunk_duration_s for t in ttbc),
        "stages_s": stages,
        # What TTBC should be: the sum of the stages when nothing overlaps (cases 1, 2), the slower of the
        # two paths when score (+ transfer) runs beside decode (+ publish) (cases 3, 4).
        "model": {
            "stage_sum_p50_s": sum(p50(name) for name in STAGES),
            "max_path_p50_s": max(p50("score") + p50("transfer"), p50("decode") + p50("publish")),
            "max_score_decode_p50_s": max(p50("score"), p50("decode")),
        },
    }
    if forwards_per_chunk:
        summary["forwards_per_chunk"] = forwards_per_chunk
        summary["per_forward_p50_s"] = p50("score") / forwards_per_chunk
    summary["per_decode_p50_s"] = p50("decode")
    return summary


def rank_cpu(rank_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank: wall, CPU and run-queue wait seconds over the rank's life (start-up included)."""
    keys = ("cores", "threads", "wall_s", "cpu_s", "runqueue_wait_s")
    return {str(r["rank"]): {k: r[k] for k in keys} for r in sorted(rank_reports, key=lambda r: r["rank"])}


def peak_memory(rank_reports: list[dict[str, Any]], per_chunk: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank: peak RSS (getrusage high-water mark), the largest sampled RSS, peak CUDA allocation, and
    what the memory plan (``engine.memory_plan``) planned for it."""
    sampled: dict[str, int] = {}
    for row in per_chunk:
        for rank, value in row.get("rss_bytes", {}).items():
            sampled[rank] = max(sampled.get(rank, 0), value)
    out: dict[str, Any] = {}
    for report in sorted(rank_reports, key=lambda r: r["rank"]):
        rank = str(report["rank"])
        out[rank] = {
            "role": report["role"],
            "cores": report["cores"],
            "peak_rss_bytes": report["peak_rss_bytes"],
            "sampled_rss_max_bytes": sampled.get(rank),
            "cuda_peak_allocated_bytes": report["cuda_peak_allocated_bytes"],
            # the start-up memory plan's figure for this rank (no margin), beside the measured peak
            "memory_plan": report.get("memory_plan"),
        }
    return out


# ---- running one case -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What every run of the study shares."""

    preset: str
    height: int
    width: int
    steps: int
    chunk_frames: int
    chunks: int
    dtype: str
    device: str
    warmup: int
    seed: int
    chunk_timeout_s: float
    pin: bool = True
    run_flags: tuple[str, ...] = ()  # --run-flags: more group options for every run (e.g. --fp8 linear)

    def stream(self) -> StreamConfig:
        return StreamConfig(height=self.height, width=self.width, chunk_latent_frames=self.chunk_frames)


def check_run_flags(settings: Settings) -> None:
    """``--run-flags`` parsed by ``run``'s own options (inputs are placeholders; nothing runs)."""
    from server.run_options import parse_run_options

    argv = ["--image", "x.png", "--audio", "x.wav", "--out", "x.mp4", "--preset", settings.preset,
            "--device", settings.device, *settings.run_flags]
    if settings.preset == "tiny":
        argv.append("--random-weights")
    try:
        parse_run_options(argv)
    except ValueError as exc:
        raise SystemExit(f"--run-flags {' '.join(settings.run_flags)!r} is refused by run: {exc}") from exc
    except SystemExit as exc:  # argparse printed its message
        raise SystemExit(f"--run-flags {' '.join(settings.run_flags)!r} is refused by run (above)") from exc


def skip_reason(case: Case, settings: Settings) -> str | None:
    """Why ``case`` cannot run here (too few GPUs, an SP degree the shapes do not allow), else None."""
    model = get_model_preset(settings.preset)
    if case.score_workers > 1:
        try:
            check_sp_shapes(model.num_heads, settings.stream().tokens_per_frame, case.score_workers,
                            settings.preset)
        except ValueError as exc:
            return str(exc)
    if settings.device == "cuda":
        visible = torch.cuda.device_count()
        if visible < case.world_size:
            return f"needs {case.world_size} GPUs (one per rank), {visible} visible"
    return None


def run_case(case: Case, settings: Settings, folder: Path, cores: list[int]) -> dict[str, Any]:
    """Launch one case as ``talkingmachines run``'s ranks and summarise it (status ok / skipped / failed)."""
    head: dict[str, Any] = {
        "case": case.number,
        "label": case.label,
        "decoder": case.decoder,
        "score_workers": case.score_workers,
        "ranks": case.world_size,
        "chunk_frames": settings.chunk_frames,
        "steps": settings.steps,
    }
    if settings.device == "cpu":
        head["cores_available"] = len(cores)
        head["oversubscribed"] = case.world_size > len(cores)
        head["pinned"] = settings.pin
    reason = skip_reason(case, settings)
    if reason is not None:
        return {**head, "status": "skipped", "reason": reason}
    tag = f"case{case.number}_f{settings.chunk_frames}_s{settings.steps}"
    rank_dir = folder / tag
    rank_dir.mkdir()
    samples = audio_samples_for_chunks(settings.chunks, settings.chunk_frames, settings.stream().fps)
    image, audio = write_inputs(rank_dir, samples)
    stats_path = rank_dir / "stats.json"
    run_args = [
        "--image", str(image), "--audio", str(audio), "--out", str(rank_dir / "out.mp4"),
        "--preset", settings.preset, "--resolution", f"{settings.height}x{settings.width}",
        "--steps", str(settings.steps), "--device", settings.device, "--seed", str(settings.seed),
        "--decoder", case.decoder, "--score-workers", str(case.score_workers),
        "--chunk-timeout", str(settings.chunk_timeout_s), "--stats-json", str(stats_path), "--quiet",
        "--chunk-frames", str(settings.chunk_frames), "--dtype", RUN_DTYPES[settings.dtype],
        "--rank-report", str(rank_dir),
        *settings.run_flags,
    ]
    if settings.preset == "tiny":
        # timing only: seeded random weights (the trained tiny default fixes a 15-latent window, which a
        # 7-latent chunk does not divide)
        run_args.append("--random-weights")
    if settings.device == "cpu":
        run_args += ["--threads", "1"]
        if settings.pin:
            run_args += ["--pin-cores", ",".join(map(str, cores))]
    topology = Topology(score_workers=case.score_workers, decoder=case.decoder,  # type: ignore[arg-type]
                        device=settings.device, preset=settings.preset)  # type: ignore[arg-type]
    print(f"ttbc: case {case.number} ({case.label}), chunk {settings.chunk_frames}, {settings.steps} steps",
          file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    code = launch(topology, "server.run_job:main", run_args, settle_s=3.0)
    wall = time.perf_counter() - start
    # Other processes on the machine slow the ranks down: the 1-minute load around the run says how much.
    head["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    if code != 0 or not stats_path.exists():
        return {**head, "status": "failed", "reason": f"the run exited with code {code}", "wall_s": wall}
    stats = json.loads(stats_path.read_text())
    reports = [json.loads(p.read_text()) for p in sorted(rank_dir.glob("rank*.json"))]
    per_chunk = stats["per_chunk"]
    forwards = [r["dit_forwards"] for r in reports if r["dit_forwards"]]
    forwards_per_chunk = forwards[0] / len(per_chunk) if forwards and per_chunk else None
    duration = settings.stream().chunk_duration_s(1)
    steady_from = 1 + settings.warmup
    return {
        **head,
        "status": "ok",
        "topology": stats["summary"]["topology"],
        "wall_s": wall,
        **summarise_case(per_chunk, duration, settings.warmup, forwards_per_chunk),
        "peak_memory": peak_memory(reports, per_chunk),
        "rank_cpu": rank_cpu(reports),
        "per_chunk": [{**row, "warmup": row["chunk_index"] < steady_from} for row in per_chunk],
    }


# ---- the study --------------------------------------------------------------------------------------


def ablation_case(settings: Settings, sp_degree: int) -> Case:
    """Case 3 (one score device beside the decoder) when the machine has the devices, else case 1."""
    dedicated = make_case(3, sp_degree)
    return dedicated if skip_reason(dedicated, settings) is None else make_case(1, sp_degree)


def ablation_row(result: dict[str, Any]) -> dict[str, Any]:
    """The ablation's numbers for one (chunk, steps) run: TTBC, score per chunk, score devices needed."""
    row = {k: result[k] for k in ("case", "label", "chunk_frames", "steps", "status") if k in result}
    if result["status"] != "ok":
        return {**row, "reason": result.get("reason")}
    stages = result["stages_s"]
    score = stages["score"]["p90"]
    transfer = stages["transfer"]["p90"]
    decode_path = stages["decode"]["p90"] + stages["publish"]["p90"]
    return {
        **row,
        "chunk_duration_s": result["chunk_duration_s"],
        "ttbc_s": result["ttbc_s"],
        "fraction_under_line": result["fraction_under_line"],
        "score_p90_s": score,
        "transfer_p90_s": transfer,
        "decode_publish_p90_s": decode_path,
        "score_devices": devices_needed(score, transfer, result["chunk_duration_s"]),
        "decoder_real_time": decode_path <= result["chunk_duration_s"],
        "paper_score_gpus": PAPER_SCORE_GPUS.get((result["chunk_frames"], result["steps"])),
        "ttbc_per_chunk_s": [
            r["ttbc_s"] for r in result["per_chunk"] if not r["warmup"] and r["ttbc_s"] is not None
        ],
    }


PARTIAL = "results.partial.json"


def write_partial(
    out: Path, header: dict[str, Any], cases: list[dict[str, Any]], ablation: list[dict[str, Any]]
) -> None:
    """The runs finished so far, rewritten after each one: a study cut short (a device lease, a time limit)
    still leaves its measurements. ``results.json`` replaces it when the study completes."""
    document = {**header, "benchmark": "ttbc", "complete": False, "cases": cases, "ablation": ablation}
    (out / PARTIAL).write_text(json.dumps(document, indent=2) + "\n")


def parse_resolution(text: str) -> tuple[int, int]:
    """``512`` (square) or ``HxW`` → (height, width)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--resolution {text!r} must be like 512 or 64x64 (height x width)")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttbc", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--cases", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
    parser.add_argument("--chunks", type=int, default=10, help="chunks streamed per run (K)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    parser.add_argument("--resolution", type=parse_resolution, default=(64, 64))
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the four-case comparison")
    parser.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (3 or 7)")
    parser.add_argument(
        "--dtype", choices=tuple(RUN_DTYPES), default="fp32", help="run's --dtype: float32 or bfloat16"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sp", type=int, default=2, help="N, the score workers of cases 2 and 4")
    parser.add_argument("--warmup", type=int, default=1, help="chunks after chunk 0 left out of TTBC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-timeout", type=float, default=120.0, help="seconds to wait for a latent")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="CPU: leave ranks unpinned (threads still 1)"
    )
    parser.add_argument("--ablation", action="store_true", help="also run chunk {3,7} x steps {2,4}")
    parser.add_argument(
        "--run-flags",
        default="",
        help="more group options given to every run, as one string (e.g. \"--cuda-graphs --fp8 linear "
        "--vae-decoder taew2.1\"), checked by run's own option parsing; recorded in results.json",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cases = sorted({int(c) for c in args.cases.split(",")})
    if args.chunks < 2 + args.warmup:
        raise SystemExit(f"--chunks {args.chunks} leaves no TTBC sample after chunk 0 and {args.warmup} "
                         f"warm-up chunks; use at least --chunks {2 + args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    height, width = args.resolution
    settings = Settings(
        preset=args.preset, height=height, width=width, steps=args.steps, chunk_frames=args.chunk_frames,
        chunks=args.chunks, dtype=args.dtype, device=args.device, warmup=args.warmup, seed=args.seed,
        chunk_timeout_s=args.chunk_timeout, pin=args.pin, run_flags=tuple(shlex.split(args.run_flags)),
    )
    if settings.run_flags:  # a bad flag fails here, with run's message, before any rank starts
        check_run_flags(settings)
    settings.stream()  # sizes and chunk size are valid before anything starts
    cores = sorted(os.sched_getaffinity(0))
    header = provenance("benchmarks.ttbc", argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    ablation: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ttbc_") as tmp:
        folder = Path(tmp)
        for n in cases:
            results.append(run_case(make_case(n, args.sp), settings, folder, cores))
            write_partial(args.out, header, results, ablation)
        if args.ablation:
            which = ablation_case(settings, args.sp)
            grid_folder = folder / "ablation"  # its (3, --steps) run may repeat a case above
            grid_folder.mkdir()
            for chunk_frames in ABLATION_CHUNKS:
                for steps in ABLATION_STEPS:
                    grid = replace(settings, chunk_frames=chunk_frames, steps=steps)
                    ablation.append(ablation_row(run_case(which, grid, grid_folder, cores)))
                    write_partial(args.out, header, results, ablation)
    stream = settings.stream()
    document = {
        **header,
        "benchmark": "ttbc",
        "settings": {
            "preset": args.preset,
            "resolution": f"{height}x{width}",
            "fps": stream.fps,
            "chunk_latent_frames": args.chunk_frames,
            "chunk_video_frames": stream.video_frames_in_chunk(1),
            "steps": args.steps,
            "dtype": args.dtype,
            "device": args.device,
            "sp_degree": args.sp,
            "chunks": args.chunks,
            "warmup_chunks": args.warmup,
            "torch_threads_per_rank": 1 if args.device == "cpu" else "default",
            "cpu_cores": cores if args.device == "cpu" else None,
            "pinned": args.device == "cpu" and args.pin,
            "weights": "seeded random",
            "run_flags": list(settings.run_flags),
        },
        "wall_s": time.perf_counter() - started,
        "cases": results,
        "ablation": ablation,
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.out / PARTIAL).unlink(missing_ok=True)
    if args.plots:
        from benchmarks.ttbc_plot import plot_ablation, plot_ttbc

        plot_ttbc(document, args.out / "ttbc.png")
        if ablation:
            plot_ablation(document, args.out / "ablation.png")
    print(format_table(document))
    return 0


def format_table(document: dict[str, Any]) -> str:
    """The results as Markdown tables (the README's "latest results"); times in milliseconds."""
    lines = [
        "| case | ranks | TTBC p50 | p90 | p99 | max | under line | line | first chunk | score p50 | "
        "decode p50 | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in document["cases"]:
        name = f"{case['case']}: {case['label']}"
        if case["status"] != "ok":
            blanks = "| " * 9
            lines.append(f"| {name} | {case['ranks']} {blanks}| {case['status']}: {case['reason']} |")
            continue
        t, st = case["ttbc_s"], case["stages_s"]
        load = case.get("load_average_1min")
        notes = ", ".join(
            [*(["oversubscribed"] if case.get("oversubscribed") else []),
             *([f"load {load['before']:.1f}→{load['after']:.1f}"] if load else [])]
        )
        ms = [t["p50"], t["p90"], t["p99"], t["max"]]
        cells = [
            *(f"{v * 1e3:.0f}" for v in ms),
            f"{case['fraction_under_line']:.0%}",
            f"{case['chunk_duration_s'] * 1e3:.0f}",
            f"{case['first_chunk_latency_s'] * 1e3:.0f}",
            f"{st['score']['p50'] * 1e3:.0f}",
            f"{st['decode']['p50'] * 1e3:.0f}",
            notes,
        ]
        lines.append(f"| {name} | {case['ranks']} | " + " | ".join(cells) + " |")
    if document["ablation"]:
        lines += [
            "",
            "| chunk | steps | case | TTBC p50 | line | under line | score p90 | score devices (load) | "
            "paper score GPUs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in document["ablation"]:
            if row["status"] != "ok":
                lines.append(f"| {row['chunk_frames']} | {row['steps']} | {row['case']} | | | | | "
                             f"{row['status']}: {row['reason']} | |")
                continue
            dev = row["score_devices"]
            devices = "n/a" if dev["devices"] is None else f"{dev['devices']} ({dev['load']:.2f})"
            cells = [
                row["chunk_frames"],
                row["steps"],
                row["case"],
                f"{row['ttbc_s']['p50'] * 1e3:.0f}",
                f"{row['chunk_duration_s'] * 1e3:.0f}",
                f"{row['fraction_under_line']:.0%}",
                f"{row['score_p90_s'] * 1e3:.0f}",
                devices,
                row["paper_score_gpus"],
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

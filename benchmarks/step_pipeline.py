"""Step-pipeline throughput (CPU): chunks/s of 2 stage ranks (``--step-pipeline``) vs 1 score rank.

Both cases run the product's path: ``server.launcher.launch`` starts the world, every rank runs
``server.rank_main.run_rank`` (the stage ranks ``workers.step_stage``, the single score rank
``workers.worker_loop``), and rank 0 drives ``engine.pipeline.ChunkEngine`` through ``engine.file_stream``'s
``run_stream`` with the executor ``run`` uses (``server.master.make_executor``: ``StepPipelineExecutor`` with
two chunks in flight, or ``DedicatedExecutor`` with one). The cases:

- ``disaggregated 1+1``: one score rank runs both denoising steps of every chunk;
- ``step-pipeline 2x1+1``: stage 0 runs step 0, stage 1 step 1, each on its own cache slot.

What the benchmark changes so that it measures the score side: the master's session is fed random
conditioning and audio features (no audio front-end, no encoders) and decodes nothing (a decoder that
returns blank frames), since with the tiny DiT the tiny VAE's decode (~150 ms a chunk at 32x32) dwarfs the
score stage (~20 ms) and would cap both cases at the decode rate. The score stage is made heavier by the
resolution (``--resolution``, default 128x128: 64 tokens a frame, a 576-token window). Throughput is the
steady state: chunks published after the first ``--warm-up`` chunks, divided by the time they took.

Each run also records every rank's wall, CPU and run-queue seconds (``--rank-report``): on a shared machine
the ranks wait for a core longer than they compute, and a 3-rank pipeline suffers that more than 2 ranks.
``one_process_seconds_per_chunk`` is the compute of one chunk in this process without communication (one
rank's two steps, and each stage's step), whose ratio is the speedup two free cores would allow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.provenance import provenance
from engine.chunks import PreparedInputs
from engine.file_stream import RunSession, run_stream
from engine.stats import StreamStats
from proto.chunk_specs import chunk_request_specs, chunk_seed, session_open_specs
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.wire import ChunkRequest, SessionClose, SessionOpen
from server.launcher import launch
from server.options import GroupOptions, add_group_arguments, group_options

CASES: dict[str, list[str]] = {"disaggregated 1+1": [], "step-pipeline 2x1+1": ["--step-pipeline"]}
SESSION = "bench"


class RandomRequests:
    """``RunSession``'s chunk source: ``chunks`` requests of random inputs (seeded), one character."""

    def __init__(self, model: ModelConfig, stream: StreamConfig, chunks: int, seed: int) -> None:
        self.session_id = SESSION
        self.samples_per_frame = 16_000 // stream.fps
        self.num_chunks = chunks
        self.model, self.stream, self.seed = model, stream, seed

    def __iter__(self) -> Any:
        for index in range(self.num_chunks):
            gen = torch.Generator().manual_seed(self.seed * 1000 + index)
            specs = chunk_request_specs(self.model, self.stream, 1, index)
            tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
            speaking = ((True,) * self.stream.frames_in_chunk(index),)
            request = ChunkRequest(SESSION, index, speaking, chunk_seed(self.seed, index), tensors=specs)
            frames = self.stream.video_frames_in_chunk(index)
            pcm = np.zeros(frames * self.samples_per_frame, np.float32)
            yield PreparedInputs(request, tensors, pcm, first_frame=0)


class BlankDecoder:
    """A decoder that costs nothing: blank uint8 frames ``[T, H, W, 3]`` (the benchmark times the score)."""

    def __init__(self, stream: StreamConfig) -> None:
        self.frames = torch.zeros(
            stream.video_frames_in_chunk(1), stream.height, stream.width, 3, dtype=torch.uint8
        )

    def decode_chunk(self, latent: torch.Tensor) -> torch.Tensor:
        return self.frames


class NoSink:
    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        pass


def _master(
    options: GroupOptions, chunks: int, result: Path, groups: ProcessGroups, store: dist.Store
) -> int:
    from server.master import make_executor

    model, stream = options.model_config, options.stream_config()
    executor = make_executor(options, groups, store, stream, None)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(options.seed)
    specs = session_open_specs(model, 1)
    tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    if "face_boxes" in tensors:
        tensors["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    opening = SessionOpen(SESSION, stream.latent_height, stream.latent_width, 1, tensors=specs)
    session = RunSession(RandomRequests(model, stream, chunks, options.seed), BlankDecoder(stream), NoSink())
    stats = StreamStats(groups.topology.name, stream.chunk_duration_s(1))
    executor.open_session(opening, tensors)
    run_stream(executor, session, stream, stats, overlap=True, device=groups.device)
    executor.close_session(SessionClose(SESSION))
    executor.shutdown("benchmark done")
    chunks_out = [
        {"published_at_s": c.published_at_s, "score_s": c.score_s, "transfer_s": c.transfer_s}
        for c in stats.chunks
    ]
    result.write_text(json.dumps({"topology": groups.topology.name, "chunks": chunks_out}))
    return 0


def rank_entry(argv: list[str]) -> int:
    """Every rank's entry (``server.launcher``): the group options, then ``run_rank``."""
    from server.rank_main import run_rank

    args = _parser().parse_args(argv)
    options = group_options(args, GroupOptions)
    return run_rank(
        options, lambda groups, store, _: _master(options, args.chunks, args.result, groups, store)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_group_arguments(parser, "run", "prompt (unused: random conditioning)")
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument(
        "--result", type=Path, default=None, help="(internal) where rank 0 writes its timings"
    )
    return parser


def _throughput(chunks: list[dict[str, float]], warm_up: int) -> float:
    """Chunks per second from the publish of chunk ``warm_up`` − 1 to the last one."""
    times = [c["published_at_s"] for c in chunks]
    return (len(times) - warm_up) / (times[-1] - times[warm_up - 1])


def _rank_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """Per rank (``--rank-report``): role, wall, CPU and run-queue seconds, DiT forwards. Run-queue seconds
    are the time the rank was runnable but waited for a core: the contention of a loaded machine."""
    keep = ("role", "wall_s", "cpu_s", "runqueue_wait_s", "dit_forwards")
    out = {}
    for path in sorted(folder.glob("rank*.json")):
        report = json.loads(path.read_text())
        out[path.stem] = {k: report.get(k) for k in keep}
    return out


def split_cost(resolution: str, chunks: int, warm_up: int) -> dict[str, float]:
    """Seconds per chunk in this one process, 1 thread, no communication (median after ``warm_up``): one
    ``ScoreRank`` running both steps, and the two stages' ``StepStageDiT`` run one after the other (their sum:
    what the pipeline computes per chunk, each stage recomputing the chunk's audio keys/values and noise).
    The pipeline's ideal throughput on two free cores is 1 / (the slower stage)."""
    from workers.factory import build_score_model
    from workers.score_rank import ScoreRank
    from workers.step_stage import StepStageDiT

    height, width = (int(v) for v in resolution.split("x"))
    stream = StreamConfig(height=height, width=width)
    model = build_score_model("tiny", seed=0)
    cfg = model.config
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    specs = session_open_specs(cfg, 1)
    inputs = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    if "face_boxes" in inputs:
        inputs["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    opening = SessionOpen(SESSION, stream.latent_height, stream.latent_width, 1, tensors=specs)
    whole = ScoreRank(model, stream)
    stages = [ScoreRank(StepStageDiT(model, stream, step), stream) for step in range(stream.num_steps)]
    for rank in (whole, *stages):
        rank.open_session(opening, inputs)
    handed: list[torch.Tensor] = []
    for stage in stages[1:]:
        stage.engine.receive = lambda shape, device: handed[-1]  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {"one_rank_s": [], **{f"stage{i}_s": [] for i in range(len(stages))}}
    for prepared in RandomRequests(cfg, stream, chunks, seed=0):
        start = time.perf_counter()
        whole.denoise(prepared.request, prepared.tensors)
        times["one_rank_s"].append(time.perf_counter() - start)
        for i, stage in enumerate(stages):
            start = time.perf_counter()
            out = stage.denoise(prepared.request, prepared.tensors)
            times[f"stage{i}_s"].append(time.perf_counter() - start)
            assert out is not None
            handed.append(out)
    return {name: statistics.median(values[warm_up:]) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", default="128x128")
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--warm-up", type=int, default=3, help="chunks left out of the steady state")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, the cases alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--pin-cores", default=None, help="as run's --pin-cores (rank r on core r mod len)")
    args = parser.parse_args(argv)
    if not 1 <= args.warm_up < args.chunks - 1:
        parser.error(f"--warm-up must be in 1..{args.chunks - 2}")
    common = ["--preset", "tiny", "--random-weights", "--resolution", args.resolution, "--device", "cpu"]
    common += ["--threads", str(args.threads), "--decoder", "dedicated", "--steps", "2", "--seed", "0"]
    common += ["--chunks", str(args.chunks)] + (["--pin-cores", args.pin_cores] if args.pin_cores else [])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(CASES) if repeat % 2 == 0 else list(reversed(CASES))
            for name in order:
                reports = Path(tmp) / f"{name.replace(' ', '_')}_{repeat}"
                rank_args = [*common, *CASES[name], "--result", str(Path(tmp) / "result.json")]
                rank_args += ["--rank-report", str(reports)]
                options = group_options(_parser().parse_args(rank_args), GroupOptions)
                code = launch(options.topology(), "benchmarks.step_pipeline:rank_entry", rank_args)
                if code != 0:
                    raise SystemExit(f"{name} run {repeat} failed with exit code {code}")
                measured = json.loads((Path(tmp) / "result.json").read_text())
                chunks = measured["chunks"]
                runs[name].append(
                    {
                        "chunks_per_s": _throughput(chunks, args.warm_up),
                        "score_s_median": statistics.median(c["score_s"] for c in chunks[args.warm_up :]),
                        "published_at_s": [round(c["published_at_s"], 4) for c in chunks],
                        "ranks": _rank_reports(reports),
                    }
                )
                print(f"{name} run {repeat}: {runs[name][-1]['chunks_per_s']:.2f} chunks/s", file=sys.stderr)
    summary = {name: statistics.median(r["chunks_per_s"] for r in rs) for name, rs in runs.items()}
    cost = split_cost(args.resolution, args.chunks, args.warm_up)
    ideal = cost["one_rank_s"] / max(v for k, v in cost.items() if k.startswith("stage"))
    base, pipe = summary["disaggregated 1+1"], summary["step-pipeline 2x1+1"]
    best = {name: max(r["chunks_per_s"] for r in rs) for name, rs in runs.items()}
    result = {
        **provenance("benchmarks.step_pipeline", argv),
        "benchmark": "step_pipeline",
        "settings": {
            "preset": "tiny (random weights)",
            "resolution": args.resolution,
            "denoising_steps": 2,
            "chunks": args.chunks,
            "warm_up_chunks": args.warm_up,
            "repeats": args.repeats,
            "torch_threads_per_rank": args.threads,
            "pin_cores": args.pin_cores,
            "decode": "none (blank frames): the score side's throughput",
        },
        "result": {
            "chunks_per_s_median": summary,
            "speedup": pipe / base,
            # The least disturbed run of each case (a loaded machine slows runs, never speeds them up).
            "chunks_per_s_best": best,
            "speedup_best": best["step-pipeline 2x1+1"] / best["disaggregated 1+1"],
            "one_process_seconds_per_chunk": cost,
            "ideal_speedup_on_free_cores": ideal,
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["result"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

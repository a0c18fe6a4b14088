"""Batched sessions (``--max-batch-sessions``): two sessions' chunks per second, batched vs one by one.

Two measurements, both of the product code:

- ``serve``: the real server (``talkingmachines serve``, self-contained 1 = ``--decoder colocated``, one torch
  thread) with two flat-out sessions (``--ahead`` far beyond the stream, so both are always due) and file
  outputs, once with ``--max-batch-sessions 1`` and once with 2; chunks/s = the chunks both sessions
  generated between the moment both had ``--skip`` chunks and the moment both had ``--chunks``, over that
  time (``GET /v1/sessions/{id}``), and the stage means (``/metrics``).
- ``score``: the score rank alone in this process (``workers.score_rank.ScoreRank``, the in-process
  executor's path): ``denoise_batch`` of both sessions' chunk vs ``denoise`` of each, chunks/s over
  ``--chunks`` chunks per session.

    python -m benchmarks.batch_sessions --out benchmarks/results/batch_sessions_cpu.json

Both measurements alternate their two modes ``--repeats`` times (a change of load on a shared machine then
hits both) and keep every run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import provenance
from benchmarks.serve_ttbc import REPO, _free_port, _request, _stage_means
from proto.chunk_specs import chunk_request_specs, chunk_seed, session_open_specs
from proto.stream_config import StreamConfig
from proto.wire import ChunkBatchRequest, ChunkRequest, SessionOpen
from server.options import evenly_spaced_steps
from workers.factory import build_score_model
from workers.score_rank import ScoreRank


def measure_serve(max_batch: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One self-contained server, two flat-out sessions: their chunks per second and stage means."""
    port = _free_port()
    out = folder / f"batch{max_batch}"
    out.mkdir(parents=True)
    config = folder / f"batch{max_batch}.toml"
    config.write_text(
        f'[api]\napi_key = "benchmark-key-0123456789"\ndrain_timeout_s = 0\nfile_output_dir = "{out}"\n'
    )
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
        "--preset", args.preset, "--random-weights", "--resolution", args.resolution,
        "--steps", str(args.steps), "--score-workers", "1", "--decoder", "colocated", "--device", "cpu",
        "--threads", "1", "--ahead", "100000", "--max-batch-sessions", str(max_batch),
    ]  # fmt: skip
    log_path = folder / f"batch{max_batch}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not get ready:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        image = base64.b64encode((REPO / "examples" / "portrait.png").read_bytes()).decode()
        ids = [
            _request(
                f"{url}/v1/sessions",
                "POST",
                {"image": image, "output": {"type": "file", "path": f"s{i}.mp4"}},
            )["id"]
            for i in range(2)
        ]
        started = time.perf_counter()
        window_start = window_chunks = None
        while True:
            counts = [_request(f"{url}/v1/sessions/{i}")["chunks_generated"] for i in ids]
            now = time.perf_counter()
            if window_start is None and min(counts) >= args.skip:
                window_start, window_chunks = now, sum(counts)
            if min(counts) >= args.chunks or now - started > args.timeout:
                break
            time.sleep(0.1)
        metrics = _request(f"{url}/metrics").decode()
        for i in ids:
            _request(f"{url}/v1/sessions/{i}", "DELETE")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if window_start is None or window_chunks is None:
        raise RuntimeError(f"the sessions did not reach {args.skip} chunks within {args.timeout} s")
    batched = "sessions' chunks scored together" in log_path.read_text()
    return {
        "max_batch_sessions": max_batch,
        "chunks_per_session": counts,
        "window_chunks": sum(counts) - window_chunks,
        "window_s": now - window_start,
        "chunks_per_s": (sum(counts) - window_chunks) / (now - window_start),
        "batched": batched,
        "stage_means_s": _stage_means(metrics),
    }


def _session_open(cfg, stream, session_id: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    specs = session_open_specs(cfg, 1)
    message = SessionOpen(session_id, stream.latent_height, stream.latent_width, 1, tensors=specs)
    tensors = {s.name: torch.rand(s.shape, generator=gen) for s in specs}
    if "face_boxes" in tensors:
        tensors["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    return message, tensors


def _chunk(cfg, stream, session_id: str, index: int, seed: int):
    gen = torch.Generator().manual_seed(1000 * seed + index)
    specs = chunk_request_specs(cfg, stream, 1, index)
    speaking = ((True,) * stream.frames_in_chunk(index),)
    message = ChunkRequest(session_id, index, speaking, chunk_seed(seed, index), tensors=specs)
    return message, {s.name: torch.randn(s.shape, generator=gen) for s in specs}


def measure_score(args: argparse.Namespace) -> dict[str, Any]:
    """The score rank alone: two sessions' chunks batched vs one by one, chunks per second (the two modes
    alternate ``--repeats`` times; the best of each is kept, the least disturbed by other load)."""
    height, width = (int(v) for v in args.resolution.split("x"))
    stream = StreamConfig(height=height, width=width, denoising_steps=evenly_spaced_steps(args.steps))
    torch.set_num_threads(1)
    model = build_score_model(args.preset, seed=0)
    cfg = model.config
    sessions = (("a", 1), ("b", 2))
    results: dict[str, Any] = {}
    for mode in ("alone", "batched") * args.repeats:
        rank = ScoreRank(model, stream)
        for sid, seed in sessions:
            rank.open_session(*_session_open(cfg, stream, sid, seed))
        start = time.perf_counter()
        for i in range(args.chunks):
            parts = [_chunk(cfg, stream, sid, i, seed) for sid, seed in sessions]
            if mode == "alone":
                for msg, tensors in parts:
                    rank.denoise(msg, tensors)
            else:
                batch = ChunkBatchRequest(tuple(m for m, _ in parts))
                rank.denoise_batch(batch, batch.join([t for _, t in parts]))
        elapsed = time.perf_counter() - start
        chunks = len(sessions) * args.chunks
        best = results.get(mode)
        if best is None or elapsed < best["seconds"]:
            results[mode] = {"chunks": chunks, "seconds": elapsed, "chunks_per_s": chunks / elapsed}
    results["speed_up"] = results["batched"]["chunks_per_s"] / results["alone"]["chunks_per_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_sessions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--chunks", type=int, default=12, help="chunks per session")
    parser.add_argument("--skip", type=int, default=3, help="chunks per session before the serve window")
    parser.add_argument("--steps", type=int, default=32, help="denoising steps (a heavier score stage)")
    parser.add_argument(
        "--resolution", default="32x32", help="HxW (at 64x64 the tiny VAE's decode dominates the chunk)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per server at most")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each mode")
    args = parser.parse_args(argv)
    print("batch_sessions: score rank ...", file=sys.stderr, flush=True)
    score = measure_score(args)
    alone, batched = score["alone"]["chunks_per_s"], score["batched"]["chunks_per_s"]
    print(
        f"  score: {alone:.2f} chunks/s alone, {batched:.2f} batched (x{score['speed_up']:.2f})",
        file=sys.stderr,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternating, so that a change of load hits both
            for n in (1, 2):
                print(f"batch_sessions: serve --max-batch-sessions {n} ...", file=sys.stderr, flush=True)
                run = measure_serve(n, args, Path(tmp) / f"r{repeat}")
                runs.append(run)
                print(f"  {run['chunks_per_s']:.2f} chunks/s (batched: {run['batched']})", file=sys.stderr)
    serve = {
        n: max((r for r in runs if r["max_batch_sessions"] == n), key=lambda r: r["chunks_per_s"])
        for n in (1, 2)
    }
    ratios = [b["chunks_per_s"] / a["chunks_per_s"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    summary = {
        "score_speed_up": score["speed_up"],
        "serve_speed_up_best": serve[2]["chunks_per_s"] / serve[1]["chunks_per_s"],
        "serve_speed_up_per_repeat": ratios,
        "serve_batched": all(r["batched"] for r in runs if r["max_batch_sessions"] == 2),
    }
    document = {
        "benchmark": "batch_sessions",
        "what": f"two flat-out sessions, preset {args.preset}, seeded random weights, {args.resolution}, "
        f"{args.steps} denoising steps, one torch thread: the score rank alone, and talkingmachines serve "
        "self-contained 1 with --max-batch-sessions 1 vs 2",
        **provenance("benchmarks.batch_sessions", argv),
        "score": score,
        "serve_best": {f"max_batch_sessions_{n}": r for n, r in serve.items()},
        "serve_runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

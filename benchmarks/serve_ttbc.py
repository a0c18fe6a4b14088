"""TTBC of ``talkingmachines serve`` itself: does the production engine overlap its stages?

For each topology (self-contained 1 = ``--decoder colocated``, disaggregated 1+1 = ``--decoder dedicated``)
this starts the real server as a process tree, opens one session with a file output and lets the engine run
flat out (``--ahead`` far beyond the stream, so a chunk is always due: TTBC is then the engine's own cycle,
not the playout's pace), and reads back what the server reports: the session's TTBC percentiles (time
between two published chunks, ``GET /v1/sessions/{id}``) and the mean of every stage (``/metrics``,
``tm_stage_seconds``). As in the TTBC study (``benchmarks.ttbc``), the score stage is made comparable to the
decode with seeded random weights and more denoising steps (``--steps``), so that overlap is visible.

Targets (issue "one engine"): disaggregated 1+1 TTBC <= 1.1 x max(stage); self-contained about the sum of
the stages; prepare and publish not added to TTBC.

    python -m benchmarks.serve_ttbc --out benchmarks/results/serve_ttbc_cpu.json

Every rank gets one torch thread (``--threads 1``): the disaggregated group uses two cores, the
self-contained one one core — the point of the design.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.provenance import provenance

REPO = Path(__file__).resolve().parents[1]
API_KEY = "benchmark-key-0123456789"
STAGES = ("prepare", "score", "transfer", "decode", "publish")
TOPOLOGIES = {"self-contained 1": "colocated", "disaggregated 1+1": "dedicated"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw and response.headers.get_content_type() == "application/json" else raw


def _stage_means(metrics: str) -> dict[str, float]:
    means = {}
    for stage in STAGES:
        total = re.search(rf'^tm_stage_seconds_sum{{stage="{stage}"}} (\S+)$', metrics, re.M)
        count = re.search(rf'^tm_stage_seconds_count{{stage="{stage}"}} (\S+)$', metrics, re.M)
        if total and count and float(count.group(1)) > 0:
            means[stage] = float(total.group(1)) / float(count.group(1))
    return means


def measure(decoder: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One server of this topology, one flat-out session of ``args.chunks`` chunks: its TTBC and stages."""
    port = _free_port()
    out = folder / decoder
    out.mkdir()
    config = folder / f"{decoder}.toml"
    config.write_text(f'[api]\napi_key = "{API_KEY}"\ndrain_timeout_s = 0\nfile_output_dir = "{out}"\n')
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
        "--preset", args.preset, "--random-weights", "--resolution", args.resolution,
        "--steps", str(args.steps),
        "--score-workers", "1", "--decoder", decoder, "--device", "cpu", "--threads", "1",
        "--ahead", "100000",
    ]  # fmt: skip
    log_path = folder / f"{decoder}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve ({decoder}) did not get ready:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        image = base64.b64encode((REPO / "examples" / "portrait.png").read_bytes()).decode()
        session = _request(f"{url}/v1/sessions", "POST",
                           {"image": image, "output": {"type": "file", "path": "out.mp4"}})  # fmt: skip
        started = time.perf_counter()
        while True:
            info = _request(f"{url}/v1/sessions/{session['id']}")
            if info["chunks_generated"] >= args.chunks or time.perf_counter() - started > args.timeout:
                break
            time.sleep(0.2)
        metrics = _request(f"{url}/metrics").decode()
        _request(f"{url}/v1/sessions/{session['id']}", "DELETE")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    stages = _stage_means(metrics)
    ttbc = info["ttbc"]
    slowest = max(stages.values())
    master = sum(stages[s] for s in ("prepare", "decode", "publish"))
    return {
        "decoder": decoder,
        "chunks": info["chunks_generated"],
        "ttbc_p50_s": ttbc["p50_s"],
        "ttbc_p95_s": ttbc["p95_s"],
        "ttbc_max_s": ttbc["max_s"],
        "stage_means_s": stages,
        "sum_of_stages_s": sum(stages.values()),
        "max_stage_s": slowest,
        "ttbc_over_max_stage": ttbc["p50_s"] / slowest,
        "ttbc_over_sum_of_stages": ttbc["p50_s"] / sum(stages.values()),
        "master_stages_s": master,
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per topology: the stages stacked (their sum) beside the measured TTBC p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, r in enumerate(results.values()):
        bottom = 0.0
        for stage in STAGES:
            ms = r["stage_means_s"].get(stage, 0.0) * 1e3
            ax.bar(i - 0.2, ms, 0.35, bottom=bottom, color=f"C{STAGES.index(stage)}",
                   label=stage if i == 0 else None)  # fmt: skip
            bottom += ms
        ax.bar(i + 0.2, r["ttbc_p50_s"] * 1e3, 0.35, color="black", label="TTBC p50" if i == 0 else None)
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("ms per chunk")
    ax.set_title("serve: stages (stacked) vs time between chunks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_ttbc", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument(
        "--preset", default="tiny", help="tiny, or soulx-liveact-tiny (LiveAct's schedule: 6 then 8 latents)"
    )
    parser.add_argument("--chunks", type=int, default=14, help="chunks per session")
    parser.add_argument("--steps", type=int, default=64, help="denoising steps (a heavier score stage)")
    parser.add_argument("--resolution", default="64x64")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per topology at most")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, decoder in TOPOLOGIES.items():
            print(f"serve_ttbc: {name} ...", file=sys.stderr, flush=True)
            results[name] = measure(decoder, args, Path(tmp))
            r = results[name]
            stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in r["stage_means_s"].items())
            print(f"  TTBC p50 {r['ttbc_p50_s'] * 1e3:.0f} ms (max stage {r['max_stage_s'] * 1e3:.0f}, "
                  f"sum {r['sum_of_stages_s'] * 1e3:.0f}; stages ms: {stages})", file=sys.stderr)  # fmt: skip
    dis, sc = results["disaggregated 1+1"], results["self-contained 1"]
    summary = {
        "disaggregated_ttbc_over_max_stage": dis["ttbc_over_max_stage"],
        "disaggregated_target_met": dis["ttbc_over_max_stage"] <= 1.1,
        "self_contained_ttbc_over_sum_of_stages": sc["ttbc_over_sum_of_stages"],
        "speed_up": sc["ttbc_p50_s"] / dis["ttbc_p50_s"],
    }
    document = {
        "benchmark": "serve_ttbc",
        "what": f"talkingmachines serve, one flat-out session with a file output, preset {args.preset}, "
        f"seeded random weights, {args.resolution}, {args.steps} denoising steps, one torch thread per rank",
        **provenance("benchmarks.serve_ttbc", argv),
        "results": results,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

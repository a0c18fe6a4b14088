"""Does the disaggregated pipeline overlap score and decode? TTBC of self-contained 1 vs disaggregated 1+1.

Runs ``talkingmachines run`` (tiny preset, CPU, one torch thread per rank) twice on the same inputs and seed:
``--decoder colocated`` (one process scores and decodes in turn: TTBC ≈ the sum of the stages) and
``--score-workers 1 --decoder dedicated`` (score on rank 1 while rank 0 decodes the previous chunk: TTBC ≈
the slowest stage). The tiny DiT is far cheaper than the tiny VAE at any size (2 steps at 32x32: ~5 ms
against ~50 ms with the VAE's CPU Conv2d path), so the benchmark raises the denoising steps (``--steps``)
until the two stages are comparable — otherwise overlap could not be told from no overlap. The master
publishes (x264/AAC) on its own thread, so its critical path is the decode alone. Steady state = chunks
1.. (chunk 0 has no TTBC); medians are reported with every chunk's numbers.

    python -m benchmarks.overlap --out benchmarks/results/overlap_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from benchmarks.provenance import provenance

_REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = {
    "self-contained 1": ["--decoder", "colocated", "--score-workers", "1"],
    "disaggregated 1+1": ["--decoder", "dedicated", "--score-workers", "1"],
}


def _inputs(folder: Path, seconds: float) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = folder / "face.png"
    Image.fromarray((rng.random((96, 80, 3)) * 255).astype(np.uint8)).save(image)
    t = np.arange(round(seconds * 16_000)) / 16_000
    audio = folder / "speech.wav"
    sf.write(
        audio,
        (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32),
        16_000,
    )
    return image, audio


def _run(name: str, args: list[str], common: list[str], folder: Path) -> dict[str, Any]:
    stats_path = folder / f"{name.replace(' ', '_')}.json"
    command = [sys.executable, "-m", "server.cli", "run", *common, *args, "--stats-json", str(stats_path)]
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    result = subprocess.run(command, cwd=_REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stderr}")
    stats = json.loads(stats_path.read_text())
    steady = [c for c in stats["per_chunk"] if c["ttbc_s"] is not None]

    def median(key: str) -> float:
        return float(np.median([c[key] for c in steady]))

    return {
        "topology": name,
        "args": args,
        "steady_state_median_s": {
            "ttbc": median("ttbc_s"),
            "score": median("score_s"),
            "transfer": median("transfer_s"),
            "decode": median("decode_s"),
            "publish": median("publish_s"),
            "prepare": median("prepare_s"),
        },
        "summary": stats["summary"],
        "per_chunk": stats["per_chunk"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", default="32x32")
    parser.add_argument("--steps", type=int, default=32, help="denoising steps (score comparable to decode)")
    parser.add_argument("--audio-seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image, audio = _inputs(folder, args.audio_seconds)
        common = [
            "--image",
            str(image),
            "--audio",
            str(audio),
            "--out",
            str(folder / "out.mp4"),
            "--preset",
            "tiny",
            "--resolution",
            args.resolution,
            "--steps",
            str(args.steps),
            "--threads",
            "1",
            "--device",
            "cpu",
            "--seed",
            "0",
            "--quiet",
        ]
        runs = {name: _run(name, topo, common, folder) for name, topo in TOPOLOGIES.items()}
    sc = runs["self-contained 1"]["steady_state_median_s"]
    dis = runs["disaggregated 1+1"]["steady_state_median_s"]
    slowest = max(dis["score"], dis["decode"])
    result = {
        **provenance("benchmarks.overlap", argv),
        "benchmark": "overlap",
        "settings": {
            "preset": "tiny",
            "resolution": args.resolution,
            "denoising_steps": args.steps,
            "audio_seconds": args.audio_seconds,
            "torch_threads_per_rank": 1,
            "device": "cpu",
        },
        "result": {
            "self_contained_ttbc_s": sc["ttbc"],
            "self_contained_stage_sum_s": sc["prepare"] + sc["score"] + sc["decode"] + sc["publish"],
            "disaggregated_ttbc_s": dis["ttbc"],
            "disaggregated_max_score_decode_s": slowest,
            "disaggregated_ttbc_over_max_stage": dis["ttbc"] / slowest,
            # The worker's path also holds the transfer; the master publishes on its own thread.
            "disaggregated_max_path_s": max(dis["score"] + dis["transfer"], dis["decode"], dis["publish"]),
            "target": "disaggregated TTBC <= 1.1 x max(score, decode)",
            "target_met": dis["ttbc"] <= 1.1 * slowest,
            "speed_up": sc["ttbc"] / dis["ttbc"],
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["result"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

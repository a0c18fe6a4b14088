"""Learning curves of a training run, from its JSON-lines logs.

    python -m training.plots --run DIR --out training/results

Reads DIR/vae/vae_log.jsonl, DIR/teacher/teacher_log.jsonl and DIR/student/student_log.jsonl (whichever
exist) and writes one PNG per stage: stage A's training loss and held-out PSNR (whole frame and mouth) and
lip-sync of the reconstruction; stage B's flow-matching loss and validation loss; stage C's DMD, regression
and critic losses and the validation distances to the teacher's ODE solution and to the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records (a torn last line from an interrupted run is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict[str, Any]], key: str, event: str | None = None) -> tuple[list, list]:
    """(steps, values) of `key` over records (of `event` when given) that have it."""
    rows = [
        r for r in records if r.get(key) is not None and (event is None or r.get("event") == event)
    ]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def _plot(
    panels: list[tuple[str, list[tuple[str, tuple[list, list]]], bool]],
    title: str,
    out: Path,
    marks: Sequence[tuple[int, str]] = (),
) -> Path:
    """One row of panels (ylabel, [(label, (x, y))], log y); `marks`: (step, label) vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, lines, log_y) in zip(axes, panels, strict=True):
        for label, (x, y) in lines:
            if x:
                ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3)
        for i, (step, label) in enumerate(marks):
            ax.axvline(step, color="grey", linestyle="--", linewidth=1, label=label if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run: Path, out: Path) -> list[Path]:
    """Write the PNGs for the stages found under `run`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    vae_log = run / "vae" / "vae_log.jsonl"
    if vae_log.is_file():
        r = read_log(vae_log)
        written.append(
            _plot(
                [
                    ("training loss", [("L1 + L2 + KL", series(r, "loss", "train"))], True),
                    ("held-out PSNR (dB)", [("frame", series(r, "psnr", "eval")),
                                            ("mouth box", series(r, "psnr_mouth", "eval"))], False),
                    ("lip-sync r", [("reconstruction", series(r, "lipsync_recon", "eval")),
                                    ("ground truth", series(r, "lipsync_truth", "eval"))], False),
                ],
                "stage A: tiny Wan-VAE (images, then streams)",
                out / "stage_a_vae.png",
                marks=[(e["step"], "images -> streams") for e in r if e.get("event") == "inflate"],
            )
        )  # fmt: skip
    teacher_log = run / "teacher" / "teacher_log.jsonl"
    if teacher_log.is_file():
        r = read_log(teacher_log)
        written.append(
            _plot(
                [
                    (
                        "flow-matching loss",
                        [("train", series(r, "loss")), ("validation", series(r, "val_loss"))],
                        True,
                    )
                ],
                "stage B: audio-conditioned teacher",
                out / "stage_b_teacher.png",
            )
        )
    student_log = run / "student" / "student_log.jsonl"
    if student_log.is_file():
        r = read_log(student_log)
        written.append(
            _plot(
                [
                    ("generator / critic losses", [("DMD", series(r, "dmd")),
                                                   ("regression", series(r, "regression")),
                                                   ("critic", series(r, "critic"))], True),
                    ("validation MSE", [("to teacher ODE", series(r, "val_ode_mse")),
                                        ("to data", series(r, "val_x0_mse"))], True),
                ],
                "stage C: sparse-causal DMD student (chunk 3, 2 steps)",
                out / "stage_c_student.png",
            )
        )  # fmt: skip
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plots", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training output directory")
    parser.add_argument("--out", type=Path, required=True, help="where to write the PNGs")
    args = parser.parse_args(argv)
    written = plot_run(args.run, args.out)
    if not written:
        print(f"error: no stage logs under {args.run}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

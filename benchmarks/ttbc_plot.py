"""Plots of a TTBC study (``benchmarks.ttbc`` results.json): Figure 3 (per case) and the Table 1 ablation.

- ``ttbc.png``: one box per case over its steady chunks' TTBC, every chunk drawn as a point on top, the
  real-time line (a chunk's video duration) across, and beside each box a black bar at the TTBC its stage
  times predict (sum of stages when self-contained, the slower path when disaggregated); skipped or failed
  cases are named on the x axis.
- ``ablation.png``: left, TTBC per (chunk, steps) setting against that setting's own real-time line;
  right, the score devices each setting needs to stay real time at the measured speed of one device (bars)
  with the unrounded load written on them and the paper's Table 1 GPU count as a marker.

    python -m benchmarks.ttbc_plot benchmarks/results/ttbc_cpu/results.json   # redraws both next to it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt
import numpy as np

LINE_COLOR = "#c0392b"


def _machine_title(document: dict[str, Any]) -> str:
    machine = document["machine"]
    gpus = machine.get("gpus") or []
    device = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "no GPU"
    s = document["settings"]
    return (
        f"{machine['cpu']} ({machine['cores']} cores), {device} — preset {s['preset']} {s['resolution']}, "
        f"{s['dtype']}, {s['device']}"
    )


def _steady_ttbc(case: dict[str, Any]) -> list[float]:
    return [row["ttbc_s"] for row in case["per_chunk"] if not row["warmup"] and row["ttbc_s"] is not None]


def _box_with_points(ax: plt.Axes, samples: list[list[float]], positions: list[float]) -> None:
    """Box plots at ``positions`` with every sample as a jittered point (deterministic jitter)."""
    drawn = [(p, s) for p, s in zip(positions, samples, strict=True) if s]
    if not drawn:
        return
    ax.boxplot([s for _, s in drawn], positions=[p for p, _ in drawn], widths=0.5, showfliers=False,
               medianprops={"color": "black"})
    rng = np.random.default_rng(0)
    for position, values in drawn:
        jitter = rng.uniform(-0.12, 0.12, size=len(values))
        ax.scatter(position + jitter, values, s=14, alpha=0.75, zorder=3)


def plot_ttbc(document: dict[str, Any], path: Path) -> None:
    """Figure 3: TTBC per case (box + points, seconds) and the real-time line."""
    cases = document["cases"]
    fig, ax = plt.subplots(figsize=(9, 5))
    positions = list(range(1, len(cases) + 1))
    labels = []
    for case in cases:
        label = f"{case['case']}: {case['label']}"
        if case["status"] != "ok":
            label += f"\n({case['status']})"
        elif case.get("oversubscribed"):
            label += "\n(oversubscribed)"
        labels.append(label)
    _box_with_points(ax, [_steady_ttbc(c) if c["status"] == "ok" else [] for c in cases], positions)
    # What each design should give from its own stage times: the stage sum when nothing overlaps
    # (self-contained), the slower of score+transfer and decode+publish when they overlap (disaggregated).
    expected = [
        (p, c["model"]["max_path_p50_s" if c["decoder"] == "dedicated" else "stage_sum_p50_s"])
        for p, c in zip(positions, cases, strict=True)
        if c["status"] == "ok"
    ]
    if expected:
        ax.scatter([p + 0.32 for p, _ in expected], [v for _, v in expected], marker="_", s=300,
                   color="black", linewidths=2, zorder=4, label="expected from stage p50s")
    durations = {c["chunk_duration_s"] for c in cases if c["status"] == "ok"}
    for duration in sorted(durations):
        ax.axhline(duration, color=LINE_COLOR, linestyle="--",
                   label=f"real time: {duration * 1e3:.0f} ms/chunk")
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_xlim(0.4, len(cases) + 0.6)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("TTBC (s), steady chunks")
    s = document["settings"]
    ax.set_title(
        f"TTBC per server design — {s['chunk_latent_frames']}-latent-frame chunks, {s['steps']} steps\n"
        f"{_machine_title(document)}",
        fontsize=9,
    )
    if durations or expected:
        ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(document: dict[str, Any], path: Path) -> None:
    """Table 1, measured: TTBC per (chunk, steps) and the score devices each needs for real time."""
    rows = document["ablation"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    positions = list(range(1, len(rows) + 1))
    labels = [f"chunk {r['chunk_frames']}\n{r['steps']} steps" for r in rows]
    ok = [r["status"] == "ok" for r in rows]
    _box_with_points(left, [r["ttbc_per_chunk_s"] if good else [] for r, good in zip(rows, ok, strict=True)],
                     positions)
    for position, row, good in zip(positions, rows, ok, strict=True):
        if good:
            left.hlines(row["chunk_duration_s"], position - 0.4, position + 0.4, color=LINE_COLOR,
                        linestyle="--", label="real time (chunk duration)" if position == 1 else None)
    left.set_xticks(positions, labels, fontsize=8)
    left.set_xlim(0.4, len(rows) + 0.6)
    left.set_ylim(bottom=0)
    left.set_ylabel("TTBC (s), steady chunks")
    case = next((r for r in rows if r["status"] == "ok"), rows[0] if rows else None)
    left.set_title(f"TTBC (case {case['case']}: {case['label']})" if case else "TTBC", fontsize=9)
    left.legend(loc="upper left", fontsize=8)
    left.grid(axis="y", alpha=0.3)

    devices = [r["score_devices"]["devices"] if good and r["score_devices"]["devices"] else 0
               for r, good in zip(rows, ok, strict=True)]
    bars = right.bar(positions, devices, width=0.5, label="measured (ceil of load)")
    for bar, row, good in zip(bars, rows, ok, strict=True):
        load = row["score_devices"]["load"] if good else None
        text = "n/a" if load is None else f"load {load:.2f}"
        right.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                       va="bottom", fontsize=8)
    paper = [r.get("paper_score_gpus") for r in rows]
    right.scatter([p for p, g in zip(positions, paper, strict=True) if g], [g for g in paper if g],
                  marker="D", color="black", zorder=3, label="paper, H100s (Table 1)")
    right.set_xticks(positions, labels, fontsize=8)
    right.set_ylabel("score devices for real time")
    right.set_ylim(0, max([*devices, *(g or 0 for g in paper), 1]) + 1)
    right.set_title("score devices = ceil(score / (chunk duration − transfer)), p90", fontsize=9)
    right.legend(loc="upper right", fontsize=8)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Chunk size × steps ablation — {_machine_title(document)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.ttbc_plot RESULTS_JSON", file=sys.stderr)
        return 2
    results = Path(args[0])
    document = json.loads(results.read_text())
    plot_ttbc(document, results.parent / "ttbc.png")
    if document.get("ablation"):
        plot_ablation(document, results.parent / "ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

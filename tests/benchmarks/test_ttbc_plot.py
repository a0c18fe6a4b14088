"""The TTBC plots, drawn from a synthetic results document."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from benchmarks.ttbc_plot import main as plot_main
from benchmarks.ttbc_plot import plot_ablation, plot_ttbc


def _case(number: int, label: str, decoder: str, ttbc: list[float], status: str = "ok") -> dict:
    if status != "ok":
        return {"case": number, "label": label, "decoder": decoder, "status": status, "reason": "no GPU"}
    rows = [{"chunk_index": 0, "ttbc_s": None, "warmup": True}]
    rows += [{"chunk_index": i + 1, "ttbc_s": t, "warmup": False} for i, t in enumerate(ttbc)]
    return {"case": number, "label": label, "decoder": decoder, "status": "ok", "chunk_duration_s": 0.75,
            "model": {"stage_sum_p50_s": 0.8, "max_path_p50_s": 0.45}, "per_chunk": rows,
            "oversubscribed": number == 4}


def _document() -> dict:
    ablation = [
        {"case": 3, "label": "disaggregated 1+1", "chunk_frames": f, "steps": s, "status": "ok",
         "chunk_duration_s": 0.75 if f == 3 else 1.75, "ttbc_per_chunk_s": [0.4, 0.5],
         "score_devices": {"devices": 1, "load": 0.3}, "paper_score_gpus": p}
        for f, s, p in ((3, 2, 1), (3, 4, 2), (7, 2, 2))
    ]
    ablation.append({"case": 3, "label": "disaggregated 1+1", "chunk_frames": 7, "steps": 4,
                     "status": "failed", "reason": "exit 1", "paper_score_gpus": 4})
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "gpus": []},
        "settings": {"preset": "tiny", "resolution": "64x64", "dtype": "fp32", "device": "cpu",
                     "chunk_latent_frames": 3, "steps": 64},
        "cases": [
            _case(1, "self-contained 1", "colocated", [0.8, 0.82, 0.79]),
            _case(2, "self-contained 2 (SP)", "colocated", [], status="skipped"),
            _case(3, "disaggregated 1+1", "dedicated", [0.45, 0.5, 0.44]),
            _case(4, "disaggregated 2+1", "dedicated", [0.6, 0.7, 0.65]),
        ],
        "ablation": ablation,
    }


def test_ttbc_plot_is_a_png_of_the_figure_size(tmp_path: Path) -> None:
    path = tmp_path / "ttbc.png"
    plot_ttbc(_document(), path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1080, 600)  # 9 x 5 inches at 120 dpi


def test_ablation_plot_draws_a_failed_setting_without_numbers(tmp_path: Path) -> None:
    path = tmp_path / "ablation.png"
    plot_ablation(_document(), path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1320, 576)  # 11 x 4.8 inches at 120 dpi


def test_plot_command_redraws_both_plots_next_to_the_results(tmp_path: Path) -> None:
    import json

    results = tmp_path / "results.json"
    results.write_text(json.dumps(_document()))
    assert plot_main([str(results)]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"ttbc.png", "ablation.png"}

"""One short real TTBC study (tiny preset, CPU, 3 chunks, cases 1 and 3): the results' schema and contents.

Timings are recorded, never asserted: only counts, shapes and the provenance are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ttbc import main


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ttbc")
    argv = ["--preset", "tiny", "--cases", "1,3", "--chunks", "3", "--warmup", "0", "--out", str(out),
            "--resolution", "32x32", "--steps", "2"]
    assert main(argv) == 0
    document = json.loads((out / "results.json").read_text())
    document["_out"] = str(out)
    return document


def test_header_names_the_machine_commit_and_command(study: dict) -> None:
    assert study["machine"]["cores"] >= 1 and "cpu" in study["machine"]
    assert "commit" in study
    assert study["command"].startswith("python -m benchmarks.ttbc --preset tiny --cases 1,3")
    settings = study["settings"]
    assert (settings["resolution"], settings["fps"], settings["chunk_latent_frames"]) == ("32x32", 16, 3)
    assert (settings["steps"], settings["dtype"], settings["chunk_video_frames"]) == (2, "fp32", 12)


def test_every_chunk_is_recorded_and_chunk_zero_is_not_a_ttbc_sample(study: dict) -> None:
    for case in study["cases"]:
        assert case["status"] == "ok"
        assert [row["chunk_index"] for row in case["per_chunk"]] == [0, 1, 2]
        assert case["per_chunk"][0]["ttbc_s"] is None
        assert case["ttbc_s"]["n"] == 2
        assert case["chunk_duration_s"] == 0.75
        assert set(case["stages_s"]) == {"prepare", "score", "transfer", "decode", "publish"}


def test_each_rank_reports_its_core_and_peak_memory(study: dict) -> None:
    one, three = study["cases"]
    assert list(one["peak_memory"]) == ["0"]
    assert list(three["peak_memory"]) == ["0", "1"]
    assert three["peak_memory"]["0"]["role"] == "master"
    for case in (one, three):
        for rank in case["peak_memory"].values():
            assert len(rank["cores"]) == 1
            assert rank["peak_rss_bytes"] > 0
    assert one["oversubscribed"] is False


def test_each_rank_reports_its_cpu_and_run_queue_time(study: dict) -> None:
    for case in study["cases"]:
        assert set(case["rank_cpu"]) == set(case["peak_memory"])
        for rank in case["rank_cpu"].values():
            assert rank["threads"] == 1
            assert 0 < rank["cpu_s"]
            assert rank["runqueue_wait_s"] is None or rank["runqueue_wait_s"] >= 0
        assert set(case["load_average_1min"]) == {"before", "after"}


def test_the_score_rank_counts_one_forward_per_step(study: dict) -> None:
    for case in study["cases"]:
        assert case["forwards_per_chunk"] == 2


def test_the_plot_is_written_beside_the_results(study: dict) -> None:
    assert (Path(study["_out"]) / "ttbc.png").stat().st_size > 0
    assert not (Path(study["_out"]) / "ablation.png").exists()  # no --ablation


def test_the_ablation_reruns_the_main_setting_in_its_own_folder(tmp_path: Path) -> None:
    # --steps 2 makes the ablation's (3, 2) run the same case and setting as the main run of case 3: both
    # used to get the folder case3_f3_s2 and the study crashed on the second (FileExistsError).
    argv = ["--preset", "tiny", "--cases", "3", "--chunks", "3", "--warmup", "0", "--out", str(tmp_path),
            "--resolution", "32x32", "--steps", "2", "--ablation", "--no-plots"]
    assert main(argv) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert [c["status"] for c in document["cases"]] == ["ok"]
    grid = [(row["case"], row["chunk_frames"], row["steps"], row["status"]) for row in document["ablation"]]
    assert grid == [(3, 3, 2, "ok"), (3, 3, 4, "ok"), (3, 7, 2, "ok"), (3, 7, 4, "ok")]
    assert all(len(row["ttbc_per_chunk_s"]) == 2 for row in document["ablation"])
    # the partial file written after each run gives way to the complete one
    assert not (tmp_path / "results.partial.json").exists()

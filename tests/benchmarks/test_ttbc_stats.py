"""The TTBC study's statistics, case table and options, on synthetic per-chunk timings (no runs)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks.stream_inputs import audio_samples_for_chunks, frames_for_chunks
from benchmarks.ttbc import (
    Settings,
    ablation_row,
    devices_needed,
    make_case,
    parse_resolution,
    peak_memory,
    percentiles,
    skip_reason,
    steady_rows,
    summarise_case,
)
from server.run_options import parse_run_options


def _row(index: int, ttbc: float | None, score: float = 0.2, decode: float = 0.3, **rss: int) -> dict:
    return {
        "chunk_index": index,
        "frames": 12,
        "prepare_s": 0.01,
        "score_s": score,
        "transfer_s": 0.02,
        "decode_s": decode,
        "publish_s": 0.03,
        "published_at_s": 0.5 + index,
        "ttbc_s": ttbc,
        "rss_bytes": dict(rss),
    }


def _settings(**overrides: object) -> Settings:
    base = dict(preset="tiny", height=64, width=64, steps=2, chunk_frames=3, chunks=4, dtype="fp32",
                device="cpu", warmup=1, seed=0, chunk_timeout_s=60.0)
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


def test_percentiles_of_known_values() -> None:
    stats = percentiles([float(v) for v in range(1, 101)])
    assert stats is not None
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["max"] == 100.0
    assert stats["n"] == 100


def test_percentiles_of_nothing_is_none() -> None:
    assert percentiles([]) is None


def test_steady_rows_drop_chunk_zero_and_the_warmup_chunks() -> None:
    rows = [_row(i, None if i == 0 else 0.5) for i in range(5)]
    assert [r["chunk_index"] for r in steady_rows(rows, warmup=1)] == [2, 3, 4]
    assert [r["chunk_index"] for r in steady_rows(rows, warmup=0)] == [1, 2, 3, 4]


def test_summary_counts_chunks_over_the_real_time_line() -> None:
    rows = [_row(0, None), _row(1, 9.0), _row(2, 0.5), _row(3, 0.7), _row(4, 0.8), _row(5, 0.75)]
    summary = summarise_case(rows, chunk_duration_s=0.75, warmup=1)
    assert summary["ttbc_s"]["n"] == 4  # chunk 1 (9 s, warm-up) is not a sample
    assert summary["ttbc_s"]["max"] == 0.8
    assert summary["misses"] == 1
    assert summary["fraction_under_line"] == 0.75  # 0.75 s exactly is on time
    assert summary["first_chunk_latency_s"] == 0.5


def test_summary_models_sum_and_slowest_path() -> None:
    rows = [_row(i, None if i == 0 else 0.5, score=0.2, decode=0.3) for i in range(4)]
    model = summarise_case(rows, chunk_duration_s=0.75, warmup=0)["model"]
    assert model["stage_sum_p50_s"] == pytest.approx(0.01 + 0.2 + 0.02 + 0.3 + 0.03)
    assert model["max_path_p50_s"] == pytest.approx(0.33)  # decode + publish beats score + transfer
    assert model["max_score_decode_p50_s"] == pytest.approx(0.3)


def test_summary_per_forward_time_divides_score_by_forwards() -> None:
    rows = [_row(i, None if i == 0 else 0.5, score=0.4) for i in range(3)]
    summary = summarise_case(rows, chunk_duration_s=0.75, warmup=0, forwards_per_chunk=4)
    assert summary["per_forward_p50_s"] == pytest.approx(0.1)
    assert summary["per_decode_p50_s"] == pytest.approx(0.3)


def test_devices_needed_is_the_ceiling_of_the_load() -> None:
    # 1.5 s of score per chunk against 0.75 − 0.05 s of budget: load 2.14 → 3 devices.
    need = devices_needed(score_s=1.5, transfer_s=0.05, chunk_duration_s=0.75)
    assert need["load"] == pytest.approx(1.5 / 0.7)
    assert need["devices"] == 3


def test_devices_needed_is_at_least_one() -> None:
    assert devices_needed(score_s=0.001, transfer_s=0.0, chunk_duration_s=0.75)["devices"] == 1


def test_devices_needed_is_none_when_transfer_exceeds_the_chunk() -> None:
    need = devices_needed(score_s=0.1, transfer_s=1.0, chunk_duration_s=0.75)
    assert need["devices"] is None
    assert "transfer" in need["reason"]


def test_peak_memory_joins_rank_reports_with_sampled_rss() -> None:
    rows = [_row(0, None, **{"0": 100, "1": 50}), _row(1, 0.5, **{"0": 300, "1": 40})]
    reports = [
        {"rank": 1, "role": "score worker 0 (SP leader)", "cores": [1], "peak_rss_bytes": 60,
         "cuda_peak_allocated_bytes": None},
        {"rank": 0, "role": "master", "cores": [0], "peak_rss_bytes": 310, "cuda_peak_allocated_bytes": None},
    ]
    memory = peak_memory(reports, rows)
    assert list(memory) == ["0", "1"]
    assert memory["0"]["sampled_rss_max_bytes"] == 300
    assert memory["1"]["sampled_rss_max_bytes"] == 50
    assert memory["1"]["peak_rss_bytes"] == 60


def test_cases_have_the_papers_rank_counts() -> None:
    assert [make_case(n, 2).world_size for n in (1, 2, 3, 4)] == [1, 2, 2, 3]
    assert make_case(4, 4).label == "disaggregated 4+1"
    with pytest.raises(ValueError, match="case 5"):
        make_case(5, 2)


def test_a_sp_degree_the_heads_do_not_allow_is_skipped_with_the_reason() -> None:
    reason = skip_reason(make_case(2, 3), _settings())  # tiny has 4 heads
    assert reason is not None and "3" in reason


def test_a_case_needing_more_gpus_than_visible_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    settings = _settings(device="cuda")
    assert skip_reason(make_case(1, 2), settings) is None
    assert skip_reason(make_case(3, 2), settings) == "needs 2 GPUs (one per rank), 1 visible"


def test_ablation_row_uses_p90_score_and_the_papers_gpus() -> None:
    rows = [_row(i, None if i == 0 else 1.0, score=1.5, decode=0.3) for i in range(4)]
    rows = [{**r, "warmup": r["chunk_index"] < 2} for r in rows]
    result = {"case": 3, "label": "disaggregated 1+1", "chunk_frames": 7, "steps": 4, "status": "ok",
              **summarise_case(rows, 1.75, warmup=1), "per_chunk": rows}
    row = ablation_row(result)
    assert row["score_devices"]["devices"] == math.ceil(1.5 / (1.75 - 0.02))
    assert row["paper_score_gpus"] == 4
    assert row["decoder_real_time"] is True
    assert row["ttbc_per_chunk_s"] == [1.0, 1.0]


def test_resolution_accepts_a_square_side_or_height_by_width() -> None:
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("64x96") == (64, 96)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_resolution("64by64")


@pytest.mark.parametrize("chunk_frames", [3, 7])
def test_audio_length_gives_exactly_k_chunks_of_frames(chunk_frames: int) -> None:
    # 10 chunks of F latent frames: 1 + 4(F−1) frames, then 4F per chunk; 1000 samples per frame at 16 fps.
    frames = frames_for_chunks(10, chunk_frames)
    assert frames == (1 + 4 * (chunk_frames - 1)) + 9 * 4 * chunk_frames
    assert audio_samples_for_chunks(10, chunk_frames) == frames * 1000


def test_the_study_runs_plain_run_options_with_a_chunk_size_and_a_dtype() -> None:
    # benchmarks.ttbc launches server.run_job:main with run's arguments: --chunk-frames and --dtype under
    # run's names (its fp32/bf16 mapped by RUN_DTYPES); no rank program of its own.
    from benchmarks.ttbc import RUN_DTYPES

    run = ["--image", "a.png", "--audio", "a.wav", "--out", "o.mp4", "--resolution", "64x64",
           "--random-weights", "--device", "cpu"]
    options = parse_run_options([*run, "--chunk-frames", "7", "--dtype", RUN_DTYPES["bf16"]])
    assert options.stream_config().chunk_latent_frames == 7
    assert options.stream_config().height == 64
    assert options.dtype == "bfloat16"  # run's --dtype name: DiT, encoders and VAE autocast follow it


def test_a_chunk_size_the_training_window_cannot_hold_is_refused() -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "o.mp4", "--device", "cpu", "--random-weights"]
    with pytest.raises(ValueError, match="chunk_latent_frames=5"):
        parse_run_options([*run, "--chunk-frames", "5"])

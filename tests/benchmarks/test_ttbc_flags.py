"""``benchmarks.ttbc --run-flags``: more group options for every run of the study (gpu_check.sh's "best
combination" run), checked by run's own option parsing before any rank starts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.ttbc import Settings, build_parser, check_run_flags, main

TINY = Settings(
    preset="tiny", height=32, width=32, steps=2, chunk_frames=3, chunks=3, dtype="fp32", device="cpu",
    warmup=1, seed=0, chunk_timeout_s=60.0,
)


def test_flags_run_accepts_pass_and_the_ones_it_refuses_stop_the_study_with_its_reason() -> None:
    check_run_flags(replace(TINY, run_flags=("--vae-decoder", "taew2.1", "--kv-cache-dtype", "fp8")))
    with pytest.raises(SystemExit, match="--fp8 linear is not available here"):
        check_run_flags(replace(TINY, run_flags=("--fp8", "linear")))  # no FP8 matrix products on a CPU
    with pytest.raises(SystemExit, match="refused by run"):
        check_run_flags(replace(TINY, run_flags=("--no-such-flag",)))


def test_a_refused_flag_fails_before_any_run_starts(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--fp8 linear"):
        main(["--out", str(tmp_path), "--cases", "1", "--chunks", "3", "--run-flags", "--fp8 linear"])
    assert not (tmp_path / "results.partial.json").exists()
    assert build_parser().parse_args(["--out", "x"]).run_flags == ""

"""benchmarks.serve_ttbc reads the server's own stage histograms and draws them beside the TTBC."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.serve_ttbc import _stage_means, plot

METRICS = """\
tm_stage_seconds_count{stage="prepare"} 4.0
tm_stage_seconds_sum{stage="prepare"} 0.2
tm_stage_seconds_count{stage="score"} 4.0
tm_stage_seconds_sum{stage="score"} 2.0
tm_stage_seconds_count{stage="decode"} 0.0
tm_stage_seconds_sum{stage="decode"} 0.0
"""


def test_stage_means_are_sums_over_counts_of_observed_stages() -> None:
    assert _stage_means(METRICS) == pytest.approx({"prepare": 0.05, "score": 0.5})


def test_the_plot_is_written(tmp_path: Path) -> None:
    result = {"ttbc_p50_s": 0.5, "stage_means_s": {"prepare": 0.05, "score": 0.5}}
    path = plot({"a": result, "b": result}, tmp_path / "p.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"

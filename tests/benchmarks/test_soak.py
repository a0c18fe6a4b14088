"""benchmarks.soak: its memory slope (least squares over the second half), RSS reading and plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.soak import _fit, plot, rss_mib, worker_pids


def test_the_slope_is_fitted_over_the_second_half_only() -> None:
    cycles = np.arange(100, dtype=float)
    # A warm-up ramp of 2 MiB a cycle for 50 cycles, then a leak of 0.01 MiB a cycle with noise.
    rng = np.random.default_rng(0)
    values = np.where(cycles < 50, 800 + 2 * cycles, 900 + 0.01 * (cycles - 50)) + rng.normal(0, 0.05, 100)
    hours = cycles * 3 / 3600  # 3 s a cycle
    fit = _fit(cycles, hours, values)
    assert fit["mib_per_cycle"] == pytest.approx(0.01, abs=0.003)
    assert fit["mib_per_hour"] == pytest.approx(0.01 * 1200, rel=0.3)
    assert fit["first_half_mib_per_cycle"] == pytest.approx(2.0, abs=0.01)


def test_rss_is_read_from_proc_and_a_childless_process_has_no_workers() -> None:
    assert 10 < rss_mib(os.getpid()) < 100_000  # type: ignore[operator]
    assert worker_pids(os.getpid()) == []


def test_the_plot_is_written(tmp_path: Path) -> None:
    samples = [{"cycle": i, "t_s": 3.0 * i, "master_rss_mib": 900 + 0.1 * i, "workers_rss_mib": 700.0}
               for i in range(20)]  # fmt: skip
    cycles = np.arange(20, dtype=float)
    summary = {
        "duration_s": 60.0,
        "master": _fit(cycles, cycles / 1200, np.array([s["master_rss_mib"] for s in samples])),
        "workers": _fit(cycles, cycles / 1200, np.full(20, 700.0)),
    }
    path = plot({"samples": samples, "summary": summary}, tmp_path / "soak.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"

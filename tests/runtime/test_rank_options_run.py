"""``talkingmachines run --pin-cores --rank-report``: every rank of a real 1 + 1 world pins itself and writes
its report (the TTBC study reads the same files, ``benchmarks.ttbc``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from run_helpers import run_cli, write_inputs


def test_each_rank_pins_itself_and_reports_its_role_memory_and_forwards(tmp_path: Path) -> None:
    image, audio = write_inputs(tmp_path, 1.4)  # 3 chunks
    core = min(os.sched_getaffinity(0))
    reports = tmp_path / "reports"
    result = run_cli(
        image, audio, tmp_path / "o.mp4", "--random-weights", "--resolution", "32x32", "--quiet",
        "--score-workers", "1", "--decoder", "dedicated", "--pin-cores", str(core),
        "--rank-report", str(reports),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    master, worker = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (master["role"], master["dit_forwards"]) == ("master", None)
    assert worker["role"].startswith("score worker 0")
    assert worker["dit_forwards"] == 3 * 2  # 3 chunks x 2 denoising steps
    for rank, report in enumerate((master, worker)):
        assert (report["rank"], report["cores"], report["threads"]) == (rank, [core], 1)
        assert report["exit_code"] == 0
        assert report["peak_rss_bytes"] > 0 and report["cpu_s"] > 0
        assert report["memory_plan"]["planned_bytes"] > 0

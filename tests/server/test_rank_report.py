"""``--pin-cores`` and ``--rank-report`` (``server.rank_report``): a rank pins itself to its core and writes
what it measured about itself on exit, whatever the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from server.rank_report import ForwardCounter, RankReport, pin_to_core, planned_memory
from server.run_options import parse_run_options

REPORT_KEYS = {
    "rank", "role", "cores", "threads", "peak_rss_bytes", "cuda_peak_allocated_bytes", "dit_forwards",
    "wall_s", "cpu_s", "runqueue_wait_s", "memory_plan", "exit_code",
}  # fmt: skip
PLAN_KEYS = {"planned_bytes", "weights", "kv_cache", "decode_cache", "activations"}


@pytest.fixture
def restore_affinity():
    """pin_to_core pins every thread of this process: give each back its affinity."""
    tasks = Path("/proc/self/task")
    before = {int(t.name): os.sched_getaffinity(int(t.name)) for t in tasks.iterdir()}
    yield sorted(os.sched_getaffinity(0))
    for tid, cores in before.items():
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:
            pass


def test_pin_to_core_picks_the_core_of_the_rank(restore_affinity: list[int]) -> None:
    cores = tuple(restore_affinity)
    assert pin_to_core(len(cores) + 1, cores) == [cores[1 % len(cores)]]


def test_no_cores_leave_the_affinity_alone(restore_affinity: list[int]) -> None:
    assert pin_to_core(3, None) == restore_affinity
    assert pin_to_core(3, ()) == restore_affinity


def test_the_forward_counter_counts_passes_through_the_head() -> None:
    model = torch.nn.Sequential()
    model.head = torch.nn.Linear(2, 2)
    counter = ForwardCounter(model)
    for _ in range(3):
        model.head(torch.zeros(1, 2))
    assert counter.count == 3


def test_the_report_holds_every_field_and_the_memory_plan(tmp_path: Path) -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "o.mp4", "--device", "cpu", "--random-weights"]
    options = parse_run_options([*run, "--score-workers", "1", "--decoder", "dedicated"])
    report = RankReport(tmp_path / "reports", rank=1, cores=[0])
    path = report.write("score worker 0", torch.device("cpu"), lambda: planned_memory(options, 1), 0)
    assert path == tmp_path / "reports" / "rank1.json"  # the folder is made
    fields = json.loads(path.read_text())
    assert set(fields) == REPORT_KEYS
    assert (fields["rank"], fields["role"], fields["cores"]) == (1, "score worker 0", [0])
    assert fields["exit_code"] == 0
    assert fields["dit_forwards"] is None and fields["cuda_peak_allocated_bytes"] is None
    assert fields["peak_rss_bytes"] > 0 and fields["wall_s"] >= 0 and fields["cpu_s"] >= 0
    assert set(fields["memory_plan"]) == PLAN_KEYS and fields["memory_plan"]["weights"] > 0


def test_a_report_that_cannot_be_written_does_not_fail_the_rank(tmp_path: Path, capsys) -> None:
    def broken_plan() -> dict[str, int]:
        raise ValueError("no plan")

    report = RankReport(tmp_path, rank=0, cores=[0])
    assert report.write("master", torch.device("cpu"), broken_plan, None) is None
    assert "rank 0: no report" in capsys.readouterr().err and not list(tmp_path.iterdir())

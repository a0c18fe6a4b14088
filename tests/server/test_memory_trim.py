"""``MemoryTrimmer``: sessions that end close together cost one heap trim, after the delay."""

from __future__ import annotations

import time

from server.memory_trim import MemoryTrimmer, _glibc_trim


def test_requests_during_the_delay_are_served_by_one_trim() -> None:
    calls: list[float] = []
    trimmer = MemoryTrimmer(delay_s=0.2, trim=lambda: calls.append(time.monotonic()) or 1)
    asked = time.monotonic()
    for _ in range(5):
        trimmer.request()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(calls) == 1 and calls[0] - asked >= 0.2
    trimmer.request()
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 2


def test_the_glibc_trim_runs_here() -> None:
    trim = _glibc_trim()
    assert trim is not None  # this machine's Python runs on glibc
    assert trim() in (0, 1)

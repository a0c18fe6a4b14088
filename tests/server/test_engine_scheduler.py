"""Earliest deadline first: the due session (buffer below ahead_s) whose playout runs dry first goes next."""

from __future__ import annotations

from engine.scheduler import earliest_deadline


def test_the_least_buffered_due_session_goes_next() -> None:
    assert earliest_deadline([("a", 0.6), ("b", 0.1), ("c", 0.3)], ahead_s=0.75) == "b"


def test_sessions_at_or_above_ahead_wait() -> None:
    assert earliest_deadline([("a", 0.75), ("b", 2.0)], ahead_s=0.75) is None


def test_ties_keep_the_sessions_order() -> None:
    assert earliest_deadline([("a", 0.0), ("b", 0.0)], ahead_s=0.75) == "a"
    assert earliest_deadline([], ahead_s=0.75) is None

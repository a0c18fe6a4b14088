"""Which session's chunk goes next: earliest deadline first, generation a bounded distance ahead of playout.

A session is due when its playout buffer (generated, not yet played), counting its chunk in flight on the
workers, is below ``ahead_s`` (about one chunk); among the due sessions the one whose playout runs dry first
goes next, and ties keep the sessions' order (round-robin when all are equally served). A session that is
not due waits: generation never runs more than ``ahead_s`` plus one chunk ahead of what the viewer sees.
With ``ahead_s`` beyond the stream's length every session is always due (benchmarks run flat out).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

S = TypeVar("S")


def earliest_deadline(candidates: Iterable[tuple[S, float]], ahead_s: float) -> S | None:
    """The candidate ``(session, buffered seconds)`` with the least buffered below ``ahead_s``, else None."""
    best: tuple[float, S] | None = None
    for session, buffered in candidates:
        if buffered < ahead_s and (best is None or buffered < best[0]):
            best = (buffered, session)
    return best[1] if best is not None else None

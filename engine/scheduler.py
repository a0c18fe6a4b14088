"""Which session's chunk goes next: earliest deadline first, generation a bounded distance ahead of playout.

A session is due when its playout buffer (generated, not yet played), counting its chunk in flight on the
workers, is below ``ahead_s`` (about one chunk); among the due sessions the one whose playout runs dry first
goes next, and ties keep the sessions' order (round-robin when all are equally served). A session that is
not due waits: generation never runs more than ``ahead_s`` plus one chunk ahead of what the viewer sees.
With ``ahead_s`` beyond the stream's length every session is always due (benchmarks run flat out).

Batched sessions (``--max-batch-sessions`` > 1): ``pick_batch`` picks the most urgent due sessions whose
chunks go through one forward together (``workers.batched``), only when that keeps every session's deadline
(see its docstring); ``BatchCosts`` is the cost model it reads, measured by the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

S = TypeVar("S")


def earliest_deadline(candidates: Iterable[tuple[S, float]], ahead_s: float) -> S | None:
    """The candidate ``(session, buffered seconds)`` with the least buffered below ``ahead_s``, else None."""
    best: tuple[float, S] | None = None
    for session, buffered in candidates:
        if buffered < ahead_s and (best is None or buffered < best[0]):
            best = (buffered, session)
    return best[1] if best is not None else None


# ---- batched sessions ----------------------------------------------------------------------------------
# Cost(k): the seconds until a batch of k sessions' chunks is scored and decoded (None: not known yet).
Cost = Callable[[int], "float | None"]


def _lateness(buffers: Sequence[float], finishes: Sequence[float]) -> list[float]:
    return [max(0.0, f - b) for b, f in zip(buffers, finishes, strict=True)]


def pick_batch(
    candidates: Iterable[tuple[S, float]], ahead_s: float, max_sessions: int, cost: Cost
) -> list[S]:
    """The due sessions whose chunks go next together: earliest deadline first, batched if it harms no one.

    ``candidates``: ``(session, buffered seconds)``; a session is due below ``ahead_s`` and its deadline is
    its buffer (when its playout runs dry). Unbatched, the due sessions are served one at a time in EDF order,
    the i-th (0-based) finishing at ``(i + 1)·cost(1)``. Batching the k most urgent finishes them all at
    ``cost(k)`` and the others at ``cost(k) + j·cost(1)``. The largest k <= ``max_sessions`` is chosen for
    which (1) a batch is no dearer than its chunks one by one, ``cost(k) <= k·cost(1)``, and (2) every due
    session that meets its deadline unbatched still meets it: a batch never makes a session miss a deadline
    the EDF order would have met. Sessions behind the batch only gain (by (1) they finish no later); a
    member that misses its deadline even alone (the group is overloaded, or the session just started with
    an empty buffer) may be later, so that the others catch up: that is where batching raises throughput.
    Otherwise the most urgent alone (``earliest_deadline``). Returns [] when none is due; one session while
    ``cost(1)`` (or ``cost(k)``) is unknown. Pure: the engine gives its measured costs (``BatchCosts``).
    """
    due = sorted(((b, i, s) for i, (s, b) in enumerate(candidates) if b < ahead_s), key=lambda d: d[:2])
    if not due:
        return []
    one = cost(1)
    buffers = [b for b, _, _ in due]
    if one is None or max_sessions < 2 or len(due) < 2:
        return [due[0][2]]
    unbatched = _lateness(buffers, [(i + 1) * one for i in range(len(due))])
    for k in range(min(max_sessions, len(due)), 1, -1):
        together = cost(k)
        if together is None or together > k * one:
            continue
        finishes = [together] * k + [together + (j + 1) * one for j in range(len(due) - k)]
        batched = _lateness(buffers, finishes)
        if all(late == 0.0 for late, alone in zip(batched, unbatched, strict=True) if alone == 0.0):
            return [s for _, _, s in due[:k]]
    return [due[0][2]]


class BatchCosts:
    """The engine's measured cost of a batch of k chunks, for ``pick_batch``: a running mean per k.

    ``cost(k)``: the mean of k's samples once measured; else, from the measured sizes, the line
    t(k) ≈ a + b·k through the smallest and the largest (two sizes measured); else k·t(1) (one size: no
    saving assumed, so the first batch is tried only where chunks one by one would also keep every deadline);
    None before any chunk was measured. A batch whose cost came out above k·t(1) is then not chosen again
    while its mean stays there.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.means: dict[int, float] = {}

    def record(self, k: int, seconds: float) -> None:
        """A batch of ``k`` chunks took ``seconds`` (scored, transferred and decoded)."""
        mean = self.means.get(k)
        self.means[k] = seconds if mean is None else (1 - self.smoothing) * mean + self.smoothing * seconds

    def __call__(self, k: int) -> float | None:
        if k in self.means:
            return self.means[k]
        if not self.means:
            return None
        sizes = sorted(self.means)
        if len(sizes) == 1:
            return self.means[sizes[0]] * k / sizes[0]
        lo, hi = sizes[0], sizes[-1]
        slope = (self.means[hi] - self.means[lo]) / (hi - lo)
        return max(0.0, self.means[lo] + slope * (k - lo))

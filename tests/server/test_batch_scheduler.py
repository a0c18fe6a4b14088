"""The batch picker (``engine.scheduler.pick_batch``) and its cost model (``BatchCosts``): pure functions,
checked against an independent simulation of the unbatched earliest-deadline-first order."""

from __future__ import annotations

import random

import pytest

from engine.scheduler import BatchCosts, earliest_deadline, pick_batch


def linear(a: float, b: float):
    return lambda k: a + b * k


def test_nothing_due_and_unknown_costs() -> None:
    assert pick_batch([("a", 2.0)], ahead_s=1.0, max_sessions=4, cost=linear(0, 1)) == []
    # Before any chunk was measured the most urgent goes alone.
    assert pick_batch([("a", 0.5), ("b", 0.2)], 1.0, 4, lambda k: None) == ["b"]
    # Batching off (max 1): earliest deadline first.
    assert pick_batch([("a", 0.5), ("b", 0.2)], 1.0, 1, linear(0.1, 0.1)) == ["b"]


def test_a_cheap_batch_of_sessions_with_slack_goes_together() -> None:
    # One chunk 0.2 s, two together 0.25 s: both still meet their deadlines (0.5 s, 0.6 s).
    assert pick_batch([("a", 0.6), ("b", 0.5)], 1.0, 2, linear(0.15, 0.05)) == ["b", "a"]


def test_a_batch_that_would_make_the_most_urgent_late_is_refused() -> None:
    # b has 0.22 s left: alone it makes it (0.2 s), batched (0.25 s) it would not.
    assert pick_batch([("a", 0.6), ("b", 0.22)], 1.0, 2, linear(0.15, 0.05)) == ["b"]


def test_the_largest_batch_that_keeps_the_members_deadlines_is_chosen() -> None:
    # t(1) = 0.2, t(2) = 0.3, t(3) = 0.4. One by one: b at 0.2, c at 0.4, a at 0.6 s. All three together (0.4)
    # would make b (0.35 s left) late; b and c together (0.3) keep both, and a gains (0.5 s instead of 0.6).
    assert pick_batch([("a", 0.45), ("b", 0.35), ("c", 0.38)], 1.0, 3, linear(0.1, 0.1)) == ["b", "c"]
    # A session that misses its deadline even alone may go in a batch: b misses its 0.1 s either way (0.2
    # alone, 0.3 batched), a meets its 0.5 s either way (0.4 alone, 0.3 batched).
    assert pick_batch([("a", 0.5), ("b", 0.1)], 1.0, 2, linear(0.1, 0.1)) == ["b", "a"]
    # Not where the most urgent meets it alone (0.2 s of its 0.25 s) but not batched (0.3 s).
    assert pick_batch([("a", 0.9), ("b", 0.25)], 1.0, 2, linear(0.1, 0.1)) == ["b"]
    # Batching no cheaper than one by one is allowed only where no deadline is lost ...
    assert pick_batch([("a", 0.9), ("b", 0.25)], 1.0, 2, linear(0.0, 0.2)) == ["b"]
    assert pick_batch([("a", 0.9), ("b", 0.45)], 1.0, 2, linear(0.0, 0.2)) == ["b", "a"]
    # ... and dearer than one by one, never.
    assert pick_batch([("a", 5.0), ("b", 5.0)], 10.0, 2, lambda k: 0.2 if k == 1 else 0.5) == ["a"]


def test_the_cost_model_starts_from_one_chunk_and_learns_a_line() -> None:
    costs = BatchCosts(smoothing=0.5)
    assert costs(1) is None
    costs.record(1, 0.2)
    assert costs(1) == pytest.approx(0.2)
    assert costs(3) == pytest.approx(0.6)  # one size measured: no saving assumed
    costs.record(2, 0.3)
    assert costs(2) == pytest.approx(0.3)
    assert costs(4) == pytest.approx(0.5)  # the line through t(1) = 0.2 and t(2) = 0.3
    costs.record(1, 0.4)
    assert costs(1) == pytest.approx(0.3)  # running mean


def _unbatched_lateness(buffers: list[float], one: float) -> list[float]:
    order = sorted(range(len(buffers)), key=lambda i: buffers[i])
    late = [0.0] * len(buffers)
    for rank, i in enumerate(order):
        late[i] = max(0.0, (rank + 1) * one - buffers[i])
    return late


def test_random_states_a_batch_never_makes_a_session_miss_a_deadline_edf_meets() -> None:
    rng = random.Random(0)
    batched_decisions = 0
    for _ in range(2000):
        n = rng.randint(1, 6)
        buffers = [rng.uniform(0.0, 1.0) for _ in range(n)]
        one, saving = rng.uniform(0.05, 0.4), rng.uniform(0.0, 1.0)
        cost = linear(one * saving, one * (1 - saving))  # t(1) = one, t(k) <= k·one
        cands = [(i, b) for i, b in enumerate(buffers)]
        batch = pick_batch(cands, ahead_s=1.0, max_sessions=4, cost=cost)
        assert batch[0] == earliest_deadline(cands, 1.0)  # the most urgent always goes
        if len(batch) == 1:
            continue
        batched_decisions += 1
        rest = sorted((i for i in range(n) if i not in batch), key=lambda i: buffers[i])
        finish = {i: cost(len(batch)) for i in batch}
        finish.update({i: cost(len(batch)) + (j + 1) * one for j, i in enumerate(rest)})
        unbatched = _unbatched_lateness(buffers, one)
        for i in range(n):
            if unbatched[i] == 0.0:  # met its deadline in EDF order: meets it batched
                assert finish[i] <= buffers[i], (buffers, one, saving, batch)
            if i not in batch:  # waiting sessions only gain
                assert max(0.0, finish[i] - buffers[i]) <= unbatched[i] + 1e-12
    assert batched_decisions > 100  # the property was exercised


def _simulate(cost, max_sessions: int, seed: int, ahead_s: float, horizon: float = 30.0, spread: float = 5.0):
    """Sessions arrive at random within ``spread`` s and each wants 5..30 chunks of 0.6 s of playout; one
    engine scores them, a batch taking cost(k). Returns (deadline misses per session, chunks made by
    ``horizon``, when the last chunk was made)."""
    duration = 0.6
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    arrivals = sorted(rng.uniform(0.0, spread) for _ in range(n))
    chunks = [rng.randint(5, 30) for _ in range(n)]
    made, dry_at, misses = [0] * n, [0.0] * n, [0] * n
    now, total, last = 0.0, 0, 0.0
    while now < horizon:
        live = [i for i in range(n) if arrivals[i] <= now and made[i] < chunks[i]]
        cands = [(i, max(0.0, dry_at[i] - now) if made[i] else 0.0) for i in live]
        batch = pick_batch(cands, ahead_s, max_sessions, cost)
        if not batch:
            future = [arrivals[i] for i in range(n) if arrivals[i] > now]
            future += [dry_at[i] - ahead_s for i in live if made[i]]
            if not future:
                break
            now = max(now + 1e-6, min(future))
            continue
        now += cost(len(batch))
        for i in batch:
            if made[i] and now > dry_at[i] + 1e-9:
                misses[i] += 1
            dry_at[i] = max(dry_at[i], now) + duration
            made[i] += 1
            total += 1
        last = now
    return misses, total, last


@pytest.mark.parametrize("seed", range(40))
def test_simulated_streams_batching_misses_no_deadline_edf_meets_and_raises_throughput(seed) -> None:
    one = 0.25  # below the 0.6 s chunk: a few sessions fit in real time, more do not
    cheap = linear(0.2, 0.05)  # t(1) = 0.25, t(4) = 0.4
    edf_misses, _, _ = _simulate(cheap, 1, seed, ahead_s=0.6)
    batched_misses, _, _ = _simulate(cheap, 4, seed, ahead_s=0.6)
    assert sum(batched_misses) <= sum(edf_misses)
    for i, (b, e) in enumerate(zip(batched_misses, edf_misses, strict=True)):
        assert e > 0 or b == 0, f"session {i} misses {b} deadlines batched, none in EDF order"
    # Flat out (every session always due, all from the start): every chunk made sooner when batching is
    # cheaper ...
    _, edf_total, edf_end = _simulate(cheap, 1, seed, ahead_s=float("inf"), horizon=1e3, spread=0.0)
    _, batched_total, batched_end = _simulate(cheap, 4, seed, ahead_s=float("inf"), horizon=1e3, spread=0.0)
    assert batched_total == edf_total
    assert batched_end < 0.9 * edf_end
    # ... and exactly EDF's when it is not.
    dear = lambda k: one if k == 1 else 1.1 * k * one  # noqa: E731
    assert _simulate(dear, 4, seed, ahead_s=0.6) == _simulate(dear, 1, seed, ahead_s=0.6)

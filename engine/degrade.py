"""Deadline-aware degradation: a live session whose playout is about to run dry gets cheaper chunks.

Off by default (``--degrade off``). With ``--degrade steps`` the engine decides, once per chunk and in one
place (``engine.pipeline.ChunkEngine._prepare``), whether the session's next chunk runs the full denoising
schedule or a reduced one (``--degrade-steps K`` of the schedule's S steps), and puts the choice on the wire
(``ChunkRequest.step_indices``), so every sequence-parallel rank runs the same passes.

Slack (seconds; ``Slack``): what the session's viewer still has to watch before this chunk must be there,
minus what the chunk is expected to take::

    slack = playout buffered + video of the session's chunks already in the engine − expected chunk latency

The expected latency is an exponential moving average (``COST_EMA``) of score + transfer + decode of the
group's *full* chunks (degraded chunks do not update it: the question the policy asks is whether a full
chunk would make it). Other sessions' chunks queued ahead are not counted: earliest deadline first
(``engine.scheduler``) already serves the session nearest to running dry first. A decoded chunk still in the
publish queue is not counted either (the estimate errs towards degrading).

Policy (``DegradePolicy.decide``, pure): a session at full quality degrades when its slack drops below
``-enter_s`` and returns to full once its slack rises above ``leave_s``; in between it keeps its current
choice (hysteresis, so a slack hovering around zero does not flap chunk by chunk). A session's first chunk
is never degraded (its keys are the sink c_0 every later chunk of the session attends to), nor any chunk
before a full chunk was measured (no estimate yet).

Which steps a degraded chunk runs (``reduced_step_indices``): a sub-sequence of the trained schedule's
steps, always starting at step 0 (pure noise, σ = 1) and, for K ≥ 2, ending at the schedule's last step
(the smallest σ, whose x0 prediction is the finest), evenly spaced in between; the chunk re-noises its x0
prediction to the next *kept* step's σ with that step's own noise slab (``proto.chunk_specs.chunk_noise``),
and its x0 is the prediction of its last kept step. Every network input is at a timestep the students were
trained on; the skipped steps are what is lost (a 1-step chunk is the student's one-step x0 from pure noise:
softer detail, more temporal shimmer, mouth shapes less precise). The fill of the per-step cache slots of the
skipped steps is ``workers.streaming.StreamingDiT.fill_skipped_slots``' (nearest executed σ).

Unmeasured on a GPU: what a degraded chunk saves there (about (S − K)/S of the score stage, nothing of the
decode) and how it looks with trained weights. ``run`` accepts the options and ignores them (a file has no
playout deadline: it is generated flat out, and its chunks always run the full schedule).

The second mode (a faster decoder for the chunk) has its hook in ``ChunkQuality.decoder`` and
``DegradeConfig.mode``; it is refused at start-up until a second decoder exists (a streaming VAE carries a
per-session causal feature cache, so switching decoders mid-stream needs that decoder's own cache kept warm).
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("off", "steps")
COST_EMA = 0.3  # weight of the newest full chunk in the expected latency


@dataclass(frozen=True)
class DegradeConfig:
    """``--degrade``, ``--degrade-steps``, ``--degrade-enter``, ``--degrade-leave`` (seconds).

    mode: "off" (every chunk full) or "steps" (reduced denoising steps when late).
    steps: K, the denoising steps a degraded chunk runs (1 ≤ K < the schedule's S).
    enter_s: degrade when slack < −enter_s (≥ 0).
    leave_s: back to full when slack > leave_s (> −enter_s, so the band is not empty). It must be reachable:
        the scheduler keeps a session's buffer, counting its chunk in flight, under ``ahead_s``, so the slack
        never exceeds about ``ahead_s`` − a full chunk's latency; ``serve`` refuses leave_s ≥ ``--ahead``.
    """

    mode: str = "off"
    steps: int = 1
    enter_s: float = 0.0
    leave_s: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def step_indices(self, num_steps: int) -> tuple[int, ...]:
        """The steps a degraded chunk runs out of the schedule's ``num_steps`` (() when off)."""
        return reduced_step_indices(num_steps, self.steps) if self.mode == "steps" else ()

    def check(self, num_steps: int, window: str = "sparse-causal") -> None:
        """Raise ``ValueError`` naming the flag and the fix unless the options fit a schedule of
        ``num_steps`` denoising steps streamed in ``window`` (``StreamConfig.window``)."""
        if self.mode not in MODES:
            raise ValueError(f"--degrade must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (self.enter_s >= 0.0 and self.leave_s > -self.enter_s):
            raise ValueError(
                f"--degrade-enter must be >= 0 and --degrade-leave > -(--degrade-enter) (degrade below "
                f"-enter, recover above leave), got enter={self.enter_s!r}, leave={self.leave_s!r}"
            )
        if not self.enabled:
            return
        if window != "sparse-causal":
            raise ValueError(
                f"--degrade {self.mode} is implemented for the sparse-causal window only; the {window!r} "
                "window's per-step ConvKV memory and audio-guided steps have no fill rule for skipped steps "
                "yet: leave out --degrade"
            )
        if not 1 <= self.steps < num_steps:
            raise ValueError(
                f"--degrade-steps must be between 1 and {num_steps - 1} (fewer than the schedule's "
                f"{num_steps} denoising steps), got {self.steps}"
                + ("; a one-step schedule cannot degrade: leave out --degrade" if num_steps < 2 else "")
            )


def reduced_step_indices(num_steps: int, keep: int) -> tuple[int, ...]:
    """The indices of the ``keep`` steps a degraded chunk runs out of ``num_steps``: 0, then (keep ≥ 2) evenly
    spaced up to the last step, e.g. (4, 1) → (0,), (4, 2) → (0, 3), (4, 3) → (0, 2, 3) (rounded half up)."""
    if not 1 <= keep <= num_steps:
        raise ValueError(f"cannot keep {keep} of {num_steps} denoising steps")
    if keep == 1:
        return (0,)
    return tuple(sorted({int(i * (num_steps - 1) / (keep - 1) + 0.5) for i in range(keep)}))


@dataclass(frozen=True)
class ChunkQuality:
    """What one chunk runs: ``step_indices`` () = the full schedule; ``decoder`` None = the session's decoder
    (the hook of a per-chunk decoder choice; no mode sets it yet)."""

    step_indices: tuple[int, ...] = ()
    decoder: str | None = None

    @property
    def degraded(self) -> bool:
        return bool(self.step_indices) or self.decoder is not None


FULL = ChunkQuality()


@dataclass(frozen=True)
class Slack:
    """The inputs of one decision, seconds: see the module docstring."""

    buffered_s: float
    pending_s: float
    expected_s: float

    @property
    def seconds(self) -> float:
        return self.buffered_s + self.pending_s - self.expected_s


class DegradePolicy:
    """Full or reduced for a session's next chunk, from its slack and its current state (pure)."""

    def __init__(self, config: DegradeConfig) -> None:
        self.config = config

    def decide(self, degraded: bool, slack_s: float | None) -> bool:
        """Whether the next chunk is degraded, given whether the previous one was and the slack (None: no
        estimate yet → full)."""
        if not self.config.enabled or slack_s is None:
            return False
        if degraded:
            return not slack_s > self.config.leave_s
        return slack_s < -self.config.enter_s


@dataclass
class DegradeState:
    """A session's degradation record (on ``engine.chunks.SessionTimes``, guarded by its lock):
    ``degraded`` = its latest chunk was, ``degraded_chunks`` = how many were, ``last_slack_s`` = the slack
    of its latest decision (None before the first)."""

    degraded: bool = False
    degraded_chunks: int = 0
    last_slack_s: float | None = None


class ChunkCost:
    """The expected latency of a full chunk (score + transfer + decode, seconds): an EMA over full chunks."""

    def __init__(self, weight: float = COST_EMA) -> None:
        self.weight = weight
        self.expected_s: float | None = None

    def observe(self, seconds: float) -> None:
        if self.expected_s is None:
            self.expected_s = seconds
        else:
            self.expected_s += self.weight * (seconds - self.expected_s)

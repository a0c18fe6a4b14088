"""Per-chunk timings of a stream and their summary: TTBC percentiles, first-chunk latency, stages, memory.

Stages of one chunk (seconds, wall clock on the master):

- ``prepare``: the master's audio front-end and request building (wav2vec2 window, speaking flags, ``y``);
- ``score``: the workers' denoising time for the chunk, as the SP leader measured it (``ChunkResult``), or the
  inline call in a colocated topology;
- ``transfer``: the round trip of the chunk (request out, latent back) minus ``score``: the wire, the workers'
  queueing, the latent receive;
- ``decode``: streaming VAE decode to uint8 frames, including the device-to-host copy;
- ``publish``: handing the frames and their audio to the publisher (encoding, for the file publisher).

TTBC (time between consecutive published chunks) is measured between the ends of two publishes; the first
chunk has no predecessor, so its time from the stream start to its publish is the first-chunk latency and it
is not a TTBC sample. With overlap the steady-state TTBC approaches max(stage), without it their sum. A TTBC
is over its real-time budget when it exceeds the video duration of the chunk before it (what plays while
the next is awaited: LiveAct's chunk 1 has chunk 0's 21 frames, 0.875 s at 24 fps, later chunks 32 frames,
1.33 s); ``chunk_duration_s`` is the steady-state line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("prepare", "score", "transfer", "decode", "publish")

# RSS growth is measured from this chunk on: the first chunks allocate the KV caches, the VAE feature cache
# and the allocator's pools; afterwards memory must stay flat.
MEMORY_BASELINE_CHUNK = 3


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process on this machine, from ``/proc/<pid>/statm``; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ChunkTiming:
    """One published chunk. Times in seconds; ``published_at_s`` is measured from the stream start.

    ``rss_bytes`` maps a global rank to its RSS right after this chunk was published (ranks on other
    machines are absent).
    """

    chunk_index: int
    frames: int
    prepare_s: float
    score_s: float
    transfer_s: float
    decode_s: float
    publish_s: float
    published_at_s: float
    ttbc_s: float | None
    rss_bytes: dict[int, int] = field(default_factory=dict)
    deadline_s: float | None = None  # the TTBC budget: the previous chunk's duration (None: the steady line)
    degraded: bool = False  # ran fewer denoising steps (engine.degrade; ChunkRequest.step_indices)

    def stage(self, name: str) -> float:
        return float(getattr(self, f"{name}_s"))


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


class StreamStats:
    """Collects ``ChunkTiming`` rows of one stream and summarises them."""

    def __init__(self, topology_name: str, chunk_duration_s: float) -> None:
        self.topology_name = topology_name
        self.chunk_duration_s = chunk_duration_s
        self.chunks: list[ChunkTiming] = []

    def add(self, timing: ChunkTiming) -> None:
        self.chunks.append(timing)

    @property
    def first_chunk_latency_s(self) -> float | None:
        return self.chunks[0].published_at_s if self.chunks else None

    @property
    def ttbc_s(self) -> list[float]:
        return [c.ttbc_s for c in self.chunks if c.ttbc_s is not None]

    def memory_growth(self) -> dict[int, float]:
        """Per rank: (max RSS from chunk ``MEMORY_BASELINE_CHUNK`` on − RSS at that chunk) / RSS at it."""
        rows = [c for c in self.chunks if c.chunk_index >= MEMORY_BASELINE_CHUNK]
        if not rows:
            return {}
        growth = {}
        for rank, base in rows[0].rss_bytes.items():
            peak = max(c.rss_bytes.get(rank, base) for c in rows)
            growth[rank] = (peak - base) / base
        return growth

    def summary(self) -> dict[str, Any]:
        """TTBC percentiles (steady state, chunks 1..), first-chunk latency, per-stage percentiles."""
        ttbc = self.ttbc_s
        misses = sum(
            c.ttbc_s > (c.deadline_s if c.deadline_s is not None else self.chunk_duration_s)
            for c in self.chunks
            if c.ttbc_s is not None
        )
        return {
            "topology": self.topology_name,
            "chunks": len(self.chunks),
            "frames": sum(c.frames for c in self.chunks),
            "chunk_duration_s": self.chunk_duration_s,
            "first_chunk_latency_s": self.first_chunk_latency_s,
            "ttbc_s": _percentiles(ttbc),
            "deadline_misses": misses,
            "degraded_chunks": sum(c.degraded for c in self.chunks),
            "stages_s": {name: _percentiles([c.stage(name) for c in self.chunks]) for name in STAGES},
            "rss_growth_after_chunk_3": {str(k): v for k, v in self.memory_growth().items()},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "per_chunk": [
                {**asdict(c), "rss_bytes": {str(k): v for k, v in c.rss_bytes.items()}} for c in self.chunks
            ],
        }

    def write_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        Path(path).write_text(json.dumps({**(extra or {}), **self.to_json()}, indent=2) + "\n")

    def format_summary(self) -> str:
        """The lines ``talkingmachines run`` prints at the end."""
        s = self.summary()
        lines = [f"{s['topology']}: {s['chunks']} chunks, {s['frames']} frames"]
        first = s["first_chunk_latency_s"]
        if first is not None:
            lines.append(f"first-chunk latency  {first * 1000:9.1f} ms")
        if s["ttbc_s"] is not None:
            t = s["ttbc_s"]
            lines.append(
                f"TTBC                 p50 {t['p50'] * 1000:9.1f} ms   p95 {t['p95'] * 1000:9.1f} ms   "
                f"max {t['max'] * 1000:9.1f} ms   (real-time budget {self.chunk_duration_s * 1000:.0f} ms, "
                f"{s['deadline_misses']} over)"
            )
        for name in STAGES:
            st = s["stages_s"][name]
            if st is not None:
                lines.append(
                    f"  {name:<9}          p50 {st['p50'] * 1000:9.1f} ms   p95 {st['p95'] * 1000:9.1f} ms   "
                    f"max {st['max'] * 1000:9.1f} ms"
                )
        return "\n".join(lines)

"""The types every engine client shares: the one prepared-chunk type and a session's timing record."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from proto.wire import ChunkRequest


@dataclass
class PreparedInputs:
    """A chunk's request and what the master keeps to publish it."""

    request: ChunkRequest
    tensors: dict[str, torch.Tensor]
    pcm: np.ndarray  # [frames * spf] float32, the audio of the chunk's output frames
    first_frame: int  # absolute index of the chunk's first output video frame


@dataclass
class SessionTimes:
    """Timings of a session for its ``SessionInfo``: TTBC samples, first-frame latency. ``lock`` guards
    ``ttbc``, ``deadline_misses`` and the session's ``chunks_generated`` together, so a status read between
    the generator's updates never sees a chunk counted in one and not the other."""

    ttbc: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    deadline_misses: int = 0
    last_publish: float | None = None  # perf_counter of the session's latest publish
    last_epoch: int = 0  # the session's epoch at that publish (a clear since then is not a stall)
    first_frame_latency_s: float | None = None

"""The types every engine client shares: the one prepared-chunk type and a session's timing record."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.degrade import DegradeState
from proto.chunk_specs import chunk_seed
from proto.wire import ChunkRequest, TensorSpec, check_specs


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
    degrade: DegradeState = field(default_factory=DegradeState)  # engine.degrade's record (under lock)


def chunk_request(
    session_id: str,
    index: int,
    seed: int,
    specs: Sequence[TensorSpec],
    audio: Sequence[Any],
    conditioning: Any | None,
) -> tuple[ChunkRequest, dict[str, torch.Tensor]]:
    """Chunk ``index``'s request and tensors, for ``run`` and ``serve`` alike: each character's audio window
    (``frontends.audio_features.ChunkAudio``: ``span`` and per-latent ``speaking_latent``), the I2V ``y`` of
    the chunk (``decoder.encode.I2VConditioning``, i2v presets) and the noise seed of (session seed, index),
    checked against the request's ``specs`` (``proto.chunk_specs.chunk_request_specs``)."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name == "y":
            assert conditioning is not None
            tensors["y"] = conditioning.chunk(index).float().cpu().contiguous()
        elif spec.name == "audio":
            tensors["audio"] = torch.stack([a.span for a in audio]).float().contiguous()
    declared = tuple(TensorSpec.of(name, t) for name, t in tensors.items())
    check_specs(f"ChunkRequest {session_id} chunk {index}", specs, declared)
    request = ChunkRequest(
        session_id=session_id,
        chunk_index=index,
        speaking=tuple(tuple(bool(s) for s in a.speaking_latent.tolist()) for a in audio),
        noise_seed=chunk_seed(seed, index),
        tensors=declared,
    )
    return request, tensors

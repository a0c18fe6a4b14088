"""Executors tell in-flight chunks apart by (session, chunk): two sessions' chunk 0 are different chunks."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from engine.executor import ColocatedExecutor
from proto.wire import ChunkRequest


class _ScoreRank:
    def denoise(self, request: ChunkRequest, tensors: dict) -> torch.Tensor:
        return torch.tensor([ord(request.session_id[0]) + request.chunk_index], dtype=torch.float32)


def test_two_sessions_chunks_of_the_same_index_are_collected_as_their_own() -> None:
    topology = SimpleNamespace(world_size=1)
    groups = SimpleNamespace(is_master=True, topology=topology, device=torch.device("cpu"), rank=0)
    executor = ColocatedExecutor(groups, store=None, score_rank=_ScoreRank())  # type: ignore[arg-type]
    a = ChunkRequest(session_id="a", chunk_index=0, speaking=(), noise_seed=1, tensors=())
    b = ChunkRequest(session_id="b", chunk_index=0, speaking=(), noise_seed=2, tensors=())
    executor.submit(a, {})
    executor.submit(b, {})
    assert executor.collect(b).latent.item() == ord("b")
    assert executor.collect(a).latent.item() == ord("a")

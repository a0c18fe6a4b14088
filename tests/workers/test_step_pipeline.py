"""The step-pipeline topology in real gloo worlds: rank 0 drives a ``StepPipelineExecutor`` with one chunk
in flight per stage, ranks 1.. run ``workers.step_stage`` (2 steps on 2 stages with 1 or 2 SP ranks each,
and 3 steps on 3 stages); the latents equal one ``ScoreRank``'s within float32 rounding over chunks that
cross the point where the window stops moving; wire refusals come back as ``WorkerFailed`` and the pipeline
stays in step."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from engine.executor import WorkerError
from engine.step_pipeline import StepPipelineExecutor
from proto.chunk_specs import chunk_request_specs, chunk_seed, session_open_specs
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups, Topology
from proto.wire import ChunkRequest, SessionClose, SessionOpen
from workers.factory import build_score_model
from workers.score_rank import ScoreRank
from workers.step_stage import StepStageDiT, build_stage_rank, run_stage_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

CFG = get_model_preset("tiny")
# train_latent_frames 9 = 3 chunks of 3: chunk 3 is the first whose window stopped moving (c_2 shifted back).
STREAM = StreamConfig(height=32, width=32, train_latent_frames=9)
CHUNKS = 5
CHARACTERS = 1
TIMEOUT_S = 30.0
MODEL_SEED = 3


def session_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "context": torch.randn(CFG.text_len, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "face_boxes": torch.tensor([[0.1, 0.0, 0.9, 1.0]]),
    }


def open_message(session_id: str) -> SessionOpen:
    return SessionOpen(
        session_id,
        STREAM.latent_height,
        STREAM.latent_width,
        CHARACTERS,
        tensors=session_open_specs(CFG, CHARACTERS),
    )


def request(session_id: str, index: int) -> tuple[ChunkRequest, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + index)
    specs = chunk_request_specs(CFG, STREAM, CHARACTERS)
    tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    speaking = (tuple(bool(i % 2) for i in range(STREAM.chunk_latent_frames)),)
    msg = ChunkRequest(session_id, index, speaking, noise_seed=chunk_seed(7, index), tensors=specs)
    return msg, tensors


def _stream(steps: int) -> StreamConfig:
    return dataclasses.replace(STREAM, denoising_steps=STEPS[steps])


STEPS = {2: STREAM.denoising_steps, 3: (1000, 750, 500)}


def _world(rank: int, world: int, sp: int, steps: int, master: object) -> None:
    stream = _stream(steps)
    topology = Topology(score_workers=sp, decoder="dedicated", num_heads=CFG.num_heads, step_stages=steps)
    groups = topology.build_groups()
    if rank == 0:
        from server.launcher import world_store

        executor = StepPipelineExecutor(groups, world_store(), stream, result_timeout_s=TIMEOUT_S)
        master(executor, groups)  # type: ignore[operator]
        return
    model = build_score_model("tiny", seed=MODEL_SEED)
    assert run_stage_loop(build_stage_rank(model, stream, groups), groups) == 0


def _reference(stream: StreamConfig) -> list[torch.Tensor]:
    rank = ScoreRank(build_score_model("tiny", seed=MODEL_SEED), stream)
    rank.open_session(open_message("s1"), session_inputs())
    out = [rank.denoise(*request("s1", i)) for i in range(CHUNKS)]
    return [t for t in out if t is not None]


def _master_pipelines_chunks(executor: StepPipelineExecutor, groups: ProcessGroups) -> None:
    depth = executor.max_in_flight
    assert depth == groups.topology.step_stages
    executor.open_session(open_message("s1"), session_inputs())
    latents = []
    requests = [request("s1", i) for i in range(CHUNKS)]
    for i in range(depth - 1):
        executor.submit(*requests[i])
    for i in range(CHUNKS):
        if i + depth - 1 < CHUNKS:  # one chunk per stage in flight before chunk i is collected
            executor.submit(*requests[i + depth - 1])
        scored = executor.collect(requests[i][0])
        assert scored.score_s > 0 and scored.roundtrip_s >= 0
        latents.append(scored.latent)
    executor.close_session(SessionClose("s1"))
    executor.shutdown("test done")
    for i, (got, want) in enumerate(zip(latents, _reference(executor.stream), strict=True)):
        err = (got - want).abs().max().item()
        assert err <= 1e-5, f"chunk {i}: the step pipeline differs from one ScoreRank by {err}"
        assert want.abs().max().item() > 0.1  # not a trivially zero latent


@pytest.mark.parametrize(("sp", "steps"), [(1, 2), (2, 2), (1, 3)], ids=["2x1+1", "2x2+1", "3x1+1"])
def test_stages_give_the_latents_of_one_rank_with_one_chunk_in_flight_per_stage(
    tmp_path, sp: int, steps: int
) -> None:
    run_world(_world, 1 + steps * sp, tmp_path, sp, steps, _master_pipelines_chunks)


def _master_sends_bad_requests(executor: StepPipelineExecutor, groups: ProcessGroups) -> None:
    executor.open_session(open_message("s1"), session_inputs())
    bad, tensors = request("s1", 2)  # the stages expect chunk 0
    executor.submit(bad, tensors)
    with pytest.raises(WorkerError, match=r"ChunkRequest.chunk_index: expected 0, received 2"):
        executor.collect(bad)
    ghost, tensors = request("ghost", 0)
    executor.submit(ghost, tensors)
    with pytest.raises(WorkerError, match="'ghost' is not an open session"):
        executor.collect(ghost)
    # Every stage refused alike before any hand-off: the pipeline is still in step and chunk 0 is served.
    good, tensors = request("s1", 0)
    executor.submit(good, tensors)
    assert executor.collect(good).latent.shape == STREAM.latent_shape(0)
    executor.shutdown("test done")


def test_a_refused_request_is_reported_once_and_the_pipeline_stays_in_step(tmp_path) -> None:
    run_world(_world, 3, tmp_path, 1, 2, _master_sends_bad_requests)


def test_a_stage_engine_holds_one_cache_slot() -> None:
    model = build_score_model("tiny", seed=MODEL_SEED)
    inputs = session_inputs()
    stage = StepStageDiT(model, STREAM, step=1)
    state = stage.open_session(inputs["context"], inputs["clip_fea"])
    assert state.cache.num_slots == 1 and len(state.time_emb) == 1
    full = ScoreRank(model, STREAM).engine.open_session(inputs["context"], inputs["clip_fea"])
    assert state.cache.nbytes * STREAM.num_steps == full.cache.nbytes

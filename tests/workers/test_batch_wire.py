"""Batched sessions over the wire: ``ChunkBatchRequest`` (encode/decode, tensors per request), the score
rank's ``denoise_batch`` (the same validation as ``denoise``, each session's latent as alone), the in-process
executor, and the worker loop of a real 1 + 2 gloo world answering one ``ChunkResult`` per request."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_score_rank import STREAM, open_message, request, session_inputs

from engine.executor import InProcessExecutor
from proto.chunk_specs import chunk_result_specs
from proto.topology import ProcessGroups
from proto.wire import ChunkBatchRequest, ChunkResult, Shutdown, WireError, decode_header, recv_tensors
from workers.factory import build_score_model
from workers.score_rank import ScoreRank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world
from test_worker_loop import REPLY_TIMEOUT_S, TOPOLOGY, _reply, _send, _serve_or_master

pytestmark = pytest.mark.equality

ATOL = 1e-5  # float32: the batch's products have other shapes (see tests/workers/test_batched_sessions.py)
SEEDS = {"a": 1, "b": 2}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_score_model("tiny", seed=4)


def _open(rank_or_executor) -> None:
    for sid, seed in SEEDS.items():
        rank_or_executor.open_session(open_message(sid), session_inputs(seed))


def _alone(model, chunks: int) -> dict[str, list[torch.Tensor]]:
    rank = ScoreRank(model, STREAM)
    _open(rank)
    return {
        sid: [rank.denoise(*request(sid, i, session_seed=seed)) for i in range(chunks)]
        for sid, seed in SEEDS.items()
    }


def _batch(index: int) -> tuple[ChunkBatchRequest, dict[str, torch.Tensor]]:
    parts = [request(sid, index, session_seed=seed) for sid, seed in SEEDS.items()]
    batch = ChunkBatchRequest(tuple(msg for msg, _ in parts))
    return batch, batch.join([tensors for _, tensors in parts])


def test_a_batch_request_survives_encode_and_decode_and_splits_back_per_request() -> None:
    batch, tensors = _batch(0)
    decoded = decode_header(batch.to_bytes())
    assert decoded == batch
    assert [s.name for s in decoded.tensors][:1] == ["0/" + batch.requests[0].tensors[0].name]
    parts = decoded.split(tensors)
    for (msg, want), got in zip(
        [request(sid, 0, session_seed=s) for sid, s in SEEDS.items()], parts, strict=True
    ):
        assert list(got) == [s.name for s in msg.tensors]
        assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_batch_with_a_session_twice_or_none_is_refused() -> None:
    msg, _ = request("a", 0)
    with pytest.raises(WireError, match="repeat; a batch holds one chunk per session"):
        ChunkBatchRequest((msg, msg))
    with pytest.raises(WireError, match="at least one ChunkRequest"):
        ChunkBatchRequest(())


def test_the_score_rank_batch_gives_each_session_its_latents_alone(model) -> None:
    alone = _alone(model, 3)
    rank = ScoreRank(model, STREAM)
    _open(rank)
    for i in range(3):
        got = rank.denoise_batch(*_batch(i))
        assert got is not None
        for sid, latent in zip(SEEDS, got, strict=True):
            err = (latent - alone[sid][i]).abs().max().item()
            assert err <= ATOL, f"session {sid} chunk {i}: batched differs from alone by {err}"
    assert (alone["a"][2] - alone["b"][2]).abs().max().item() > 1e-2


def test_a_bad_request_in_a_batch_is_refused_before_any_session_advances(model) -> None:
    rank = ScoreRank(model, STREAM)
    _open(rank)
    good, good_tensors = request("a", 0, session_seed=1)
    bad, bad_tensors = request("b", 1, session_seed=2)  # session b expects chunk 0
    batch = ChunkBatchRequest((good, bad))
    with pytest.raises(WireError, match=r"ChunkRequest.chunk_index: expected 0, received 1"):
        rank.denoise_batch(batch, batch.join([good_tensors, bad_tensors]))
    assert rank.sessions["a"].state.next_chunk == 0  # nothing ran
    short = dict(bad_tensors)
    short.pop(next(iter(short)))
    batch = ChunkBatchRequest((good, request("b", 0, session_seed=2)[0]))
    with pytest.raises(WireError, match="ChunkBatchRequest"):
        rank.denoise_batch(batch, batch.join([good_tensors, short]))


def test_the_in_process_executor_scores_a_batch_and_collects_each_chunk(model) -> None:
    alone = _alone(model, 2)
    executor = InProcessExecutor(ScoreRank(model, STREAM))
    _open(executor)
    for i in range(2):
        parts = [request(sid, i, session_seed=seed) for sid, seed in SEEDS.items()]
        executor.submit_batch([m for m, _ in parts], [t for _, t in parts])
        for (msg, _), sid in zip(parts, SEEDS, strict=True):
            scored = executor.collect(msg)
            assert (scored.latent - alone[sid][i]).abs().max().item() <= ATOL


def _master_sends_batches(groups: ProcessGroups) -> None:
    for sid, seed in SEEDS.items():
        _send(groups, open_message(sid), session_inputs(seed))
    latents: dict[str, list[torch.Tensor]] = {sid: [] for sid in SEEDS}
    for i in range(2):
        batch, tensors = _batch(i)
        _send(groups, batch, tensors)
        for msg, sid in zip(batch.requests, SEEDS, strict=True):
            reply = _reply(groups)
            assert isinstance(reply, ChunkResult), reply
            reply.expect_reply_to(msg)
            got = recv_tensors(reply.tensors, groups.data, src=TOPOLOGY.sp_leader, timeout_s=REPLY_TIMEOUT_S)
            latents[sid].append(got.wait()["latent"])
            assert reply.tensors == chunk_result_specs(STREAM)
    _send(groups, Shutdown("test done"))
    alone = _alone(build_score_model("tiny", seed=4), 2)
    for sid in SEEDS:
        for i in range(2):
            err = (latents[sid][i] - alone[sid][i]).abs().max().item()
            assert err <= ATOL, f"session {sid} chunk {i}: the 1+2 batch differs from one rank alone by {err}"


def test_dedicated_workers_answer_a_batch_with_one_result_per_session(tmp_path) -> None:
    run_world(_serve_or_master, TOPOLOGY.world_size, tmp_path, _master_sends_batches)


def test_the_colocated_executor_of_one_rank_scores_a_batch_inline(model) -> None:
    from types import SimpleNamespace

    from engine.executor import ColocatedExecutor

    alone = _alone(model, 2)
    groups = SimpleNamespace(
        is_master=True, topology=SimpleNamespace(world_size=1), device=torch.device("cpu"), rank=0
    )
    executor = ColocatedExecutor(groups, store=None, score_rank=ScoreRank(model, STREAM))  # type: ignore[arg-type]
    _open(executor)
    for i in range(2):
        parts = [request(sid, i, session_seed=seed) for sid, seed in SEEDS.items()]
        executor.submit_batch([m for m, _ in parts], [t for _, t in parts])
        for (msg, _), sid in zip(parts, SEEDS, strict=True):
            assert (executor.collect(msg).latent - alone[sid][i]).abs().max().item() <= ATOL


def test_liveact_sessions_in_a_batch_run_one_after_another_as_alone() -> None:
    # The convkv-memory window is not batched (workers/batched.py says why): a batch gives each session
    # exactly its chunk alone, with one forward per pass and session.
    from dataclasses import replace

    from test_score_rank import LIVE, LIVE_STREAM, live_open, live_request

    torch.set_num_threads(1)
    model = build_score_model(LIVE.name, seed=2)

    def req(sid: str, index: int):
        msg, tensors = live_request(index)
        return replace(msg, session_id=sid, noise_seed=msg.noise_seed + (sid == "b")), tensors

    alone = ScoreRank(model, LIVE_STREAM)
    together = ScoreRank(model, LIVE_STREAM)
    for rank in (alone, together):
        for sid in ("a", "b"):
            rank.open_session(live_open(sid)[0], live_open(sid)[1])
    for i in range(2):
        want = [alone.denoise(*req(sid, i)) for sid in ("a", "b")]
        parts = [req(sid, i) for sid in ("a", "b")]
        batch = ChunkBatchRequest(tuple(m for m, _ in parts))
        got = together.denoise_batch(batch, batch.join([t for _, t in parts]))
        assert got is not None
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g)
    assert not torch.equal(want[0], want[1])

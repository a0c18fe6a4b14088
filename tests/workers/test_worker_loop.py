"""The worker loop in a real 1 + 2 gloo world: rank 0 plays a minimal master, ranks 1-2 are SP workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_score_rank import (
    CFG,
    LIVE,
    LIVE_STREAM,
    STREAM,
    live_open,
    live_request,
    open_message,
    request,
    session_inputs,
)

from proto.chunk_specs import chunk_result_specs
from proto.topology import ProcessGroups, Topology
from proto.wire import (
    ChunkResult,
    Message,
    SessionClose,
    Shutdown,
    WorkerFailed,
    broadcast_header,
    broadcast_tensors,
    recv_header,
    recv_tensors,
)
from workers.factory import build_score_model
from workers.score_rank import ScoreRank
from workers.worker_loop import run_worker_loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

TOPOLOGY = Topology(score_workers=2, decoder="dedicated", num_heads=CFG.num_heads, preset=CFG.name)
REPLY_TIMEOUT_S = 15.0


def _send(groups: ProcessGroups, msg: Message, tensors: dict[str, torch.Tensor] | None = None) -> None:
    broadcast_header(msg, groups.control, src=0)
    broadcast_tensors(getattr(msg, "tensors", ()), groups.data, src=0, tensors=tensors or {})


def _reply(groups: ProcessGroups) -> ChunkResult | WorkerFailed:
    return recv_header(  # type: ignore[return-value]
        groups.control, src=TOPOLOGY.sp_leader, expect=(ChunkResult, WorkerFailed), timeout_s=REPLY_TIMEOUT_S
    )


def _serve_or_master(rank: int, world: int, master: object) -> None:
    groups = TOPOLOGY.build_groups()
    if rank == 0:
        master(groups)  # type: ignore[operator]
        return
    model = build_score_model("tiny", seed=4)
    assert run_worker_loop(ScoreRank(model, STREAM, groups), groups, TOPOLOGY) == 0


def _master_streams_three_chunks(groups: ProcessGroups) -> None:
    _send(groups, open_message("s1"), session_inputs())
    latents = []
    for i in range(3):
        msg, tensors = request("s1", i)
        _send(groups, msg, tensors)
        reply = _reply(groups)
        assert isinstance(reply, ChunkResult), reply
        reply.expect_reply_to(msg)
        specs = chunk_result_specs(STREAM)
        assert reply.tensors == specs
        latents.append(recv_tensors(specs, groups.data, src=TOPOLOGY.sp_leader, timeout_s=REPLY_TIMEOUT_S)
                       .wait()["latent"])
    _send(groups, SessionClose("s1"))
    _send(groups, Shutdown("test done"))

    reference = ScoreRank(build_score_model("tiny", seed=4), STREAM)
    reference.open_session(open_message("s1"), session_inputs())
    for i, got in enumerate(latents):
        want = reference.denoise(*request("s1", i))
        err = (got - want).abs().max().item()
        assert err <= 1e-5, f"chunk {i}: 1+2 differs from a single ScoreRank by {err}"


def test_dedicated_workers_return_the_latents_of_one_score_rank_and_exit_0_on_shutdown(tmp_path) -> None:
    run_world(_serve_or_master, TOPOLOGY.world_size, tmp_path, _master_streams_three_chunks)


def _master_sends_bad_headers(groups: ProcessGroups) -> None:
    _send(groups, open_message("s1"), session_inputs())
    msg, tensors = request("s1", 2)  # the workers expect chunk 0
    _send(groups, msg, tensors)
    reply = _reply(groups)
    assert isinstance(reply, WorkerFailed), reply
    assert reply.rank == TOPOLOGY.sp_leader
    assert "ChunkRequest.chunk_index: expected 0, received 2" in reply.error

    msg, tensors = request("ghost", 0)
    _send(groups, msg, tensors)
    reply = _reply(groups)
    assert isinstance(reply, WorkerFailed), reply
    assert "'ghost' is not an open session" in reply.error

    # The group is still in step after refusals: chunk 0 is served.
    msg, tensors = request("s1", 0)
    _send(groups, msg, tensors)
    assert isinstance(_reply(groups), ChunkResult)
    recv_tensors(chunk_result_specs(STREAM), groups.data, src=TOPOLOGY.sp_leader, timeout_s=REPLY_TIMEOUT_S)
    _send(groups, Shutdown("test done"))


def test_a_header_mismatch_is_answered_with_worker_failed_naming_the_field(tmp_path) -> None:
    run_world(_serve_or_master, TOPOLOGY.world_size, tmp_path, _master_sends_bad_headers)


LIVE_TOPOLOGY = Topology(score_workers=2, decoder="dedicated", num_heads=LIVE.num_heads, preset=LIVE.name)


def _serve_liveact_or_master(rank: int, world: int) -> None:
    groups = LIVE_TOPOLOGY.build_groups()
    if rank == 0:
        _master_streams_liveact(groups)
        return
    model = build_score_model(LIVE.name, seed=2)
    assert run_worker_loop(ScoreRank(model, LIVE_STREAM, groups), groups, LIVE_TOPOLOGY) == 0


def _master_streams_liveact(groups: ProcessGroups) -> None:
    msg, session = live_open()
    _send(groups, msg, session)
    latents = []
    for i in range(3):
        msg, tensors = live_request(i)
        _send(groups, msg, tensors)
        reply = recv_header(
            groups.control, src=LIVE_TOPOLOGY.sp_leader, expect=(ChunkResult, WorkerFailed),
            timeout_s=REPLY_TIMEOUT_S,
        )
        assert isinstance(reply, ChunkResult), reply
        specs = chunk_result_specs(LIVE_STREAM, i)  # chunk 0: 6 latent frames, then 8
        assert reply.tensors == specs and specs[0].shape[1] == (6 if i == 0 else 8)
        received = recv_tensors(specs, groups.data, src=LIVE_TOPOLOGY.sp_leader, timeout_s=REPLY_TIMEOUT_S)
        latents.append(received.wait()["latent"])
    _send(groups, Shutdown("test done"))

    reference = ScoreRank(build_score_model(LIVE.name, seed=2), LIVE_STREAM)
    reference.open_session(*live_open())
    for i, got in enumerate(latents):
        want = reference.denoise(*live_request(i))
        err = (got - want).abs().max().item()
        assert err <= 1e-5, f"chunk {i}: 1+2 differs from a single ScoreRank by {err}"


def test_dedicated_workers_serve_the_liveact_family_with_per_chunk_result_specs(tmp_path) -> None:
    run_world(_serve_liveact_or_master, LIVE_TOPOLOGY.world_size, tmp_path)


class _BrokenScoreRank(ScoreRank):
    def denoise(self, msg, tensors):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated CUDA out of memory")


ONE_WORKER = Topology(score_workers=1, decoder="dedicated", num_heads=CFG.num_heads, preset=CFG.name)


def _broken_worker(rank: int, world: int) -> None:
    groups = ONE_WORKER.build_groups()
    if rank == 1:
        score_rank = _BrokenScoreRank(build_score_model("tiny", seed=4), STREAM, groups)
        assert run_worker_loop(score_rank, groups, ONE_WORKER) == 1
        return
    _send(groups, open_message("s1"), session_inputs())
    msg, tensors = request("s1", 0)
    _send(groups, msg, tensors)
    reply = recv_header(groups.control, src=1, expect=(ChunkResult, WorkerFailed), timeout_s=REPLY_TIMEOUT_S)
    assert isinstance(reply, WorkerFailed), reply
    assert reply.rank == 1 and "RuntimeError: simulated CUDA out of memory" in reply.error


def test_an_unexpected_exception_is_reported_and_ends_the_worker_with_exit_code_1(tmp_path) -> None:
    run_world(_broken_worker, ONE_WORKER.world_size, tmp_path)

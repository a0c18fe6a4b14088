"""Wire contract: headers round-trip, receivers reject every mismatch by name, transfers over real gloo."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from dist_world import run_world

from proto.liveness import PeerError
from proto.wire import (
    WIRE_VERSION,
    ChunkRequest,
    ChunkResult,
    SessionClose,
    SessionOpen,
    Shutdown,
    TensorSpec,
    WireError,
    WorkerFailed,
    broadcast_header,
    broadcast_tensors,
    check_specs,
    decode_header,
    recv_header,
    recv_tensors,
    send_header,
    send_tensors,
)

LATENT = TensorSpec("latent", (16, 3, 4, 4), "float32")
AUDIO = TensorSpec("audio", (1, 3, 5, 12, 32), "float32")

MESSAGES = [
    SessionOpen("s1", latent_height=8, latent_width=8, num_characters=2,
                tensors=(TensorSpec("y", (20, 3, 8, 8), "bfloat16"),)),
    SessionClose("s1"),
    ChunkRequest("s1", chunk_index=4, speaking=((True, False, True), (False, False, False)), noise_seed=7,
                 tensors=(AUDIO,)),
    ChunkResult("s1", chunk_index=4, score_seconds=0.25, tensors=(LATENT,)),
    WorkerFailed(rank=2, error="CUDA out of memory"),
    Shutdown("done"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_encode_and_decode(message) -> None:
    assert decode_header(message.to_bytes()) == message


def _patched(message, **changes) -> bytes:
    import json

    body = json.loads(message.to_bytes())
    body.update(changes)
    return json.dumps(body).encode()


def test_a_different_wire_version_is_rejected_with_both_versions() -> None:
    with pytest.raises(WireError, match=rf"header\.version: expected {WIRE_VERSION}, received 99"):
        decode_header(_patched(Shutdown(), version=99))


def test_an_unknown_kind_is_rejected() -> None:
    with pytest.raises(WireError, match=r"header\.kind: .* received 'reset'"):
        decode_header(_patched(Shutdown(), kind="reset"))


def test_missing_and_extra_fields_are_named() -> None:
    with pytest.raises(WireError, match=r"missing fields \['reason'\], unexpected fields \['why'\]"):
        decode_header(b'{"version": 1, "kind": "shutdown", "why": "x"}')


def test_a_result_for_another_chunk_names_the_chunk_index() -> None:
    request = MESSAGES[2]
    result = ChunkResult("s1", chunk_index=5, score_seconds=0.1)
    with pytest.raises(WireError, match=r"ChunkResult\.chunk_index: expected 4, received 5"):
        result.expect_reply_to(request)


def test_a_result_for_another_session_names_the_session() -> None:
    with pytest.raises(WireError, match=r"ChunkResult\.session_id: expected 's1', received 's2'"):
        ChunkResult("s2", chunk_index=4, score_seconds=0.1).expect_reply_to(MESSAGES[2])


def test_declared_shape_and_dtype_mismatches_name_the_tensor() -> None:
    shape = r"tensors\['latent'\]\.shape: expected \(16, 3, 4, 4\), received \(16, 3, 4, 2\)"
    with pytest.raises(WireError, match=shape):
        check_specs("ChunkResult", [LATENT], [TensorSpec("latent", (16, 3, 4, 2), "float32")])
    dtype = r"tensors\['latent'\]\.dtype: expected 'float32', received 'bfloat16'"
    with pytest.raises(WireError, match=dtype):
        check_specs("ChunkResult", [LATENT], [TensorSpec("latent", (16, 3, 4, 4), "bfloat16")])


def test_a_tensor_that_does_not_match_its_spec_is_not_sent() -> None:
    with pytest.raises(WireError, match=r"\['latent'\]\.shape"):
        LATENT.check(torch.zeros(16, 3, 4, 5))


def test_ragged_speaking_flags_are_rejected() -> None:
    with pytest.raises(WireError, match="one flag per latent frame"):
        ChunkRequest("s", 0, speaking=((True,), (True, False)), noise_seed=0)


def _broadcast_round_trip(rank: int, world: int) -> None:
    control = dist.new_group(backend="gloo")
    data = dist.new_group(backend="gloo")
    request = MESSAGES[2]
    audio = torch.arange(1 * 3 * 5 * 12 * 32, dtype=torch.float32).reshape(AUDIO.shape)
    got = broadcast_header(request if rank == 0 else None, control, src=0, expect=ChunkRequest, timeout_s=10)
    assert got == request
    out = broadcast_tensors(got.tensors, data, src=0, tensors={"audio": audio} if rank == 0 else None)
    assert torch.equal(out.wait()["audio"], audio)


def test_broadcast_delivers_header_and_tensors_to_every_rank(tmp_path) -> None:
    run_world(_broadcast_round_trip, 3, tmp_path)


def _p2p_round_trip(rank: int, world: int) -> None:
    control = dist.new_group(backend="gloo")
    data = dist.new_group(backend="gloo")
    result = MESSAGES[3]
    latent = torch.randn(LATENT.shape, generator=torch.Generator().manual_seed(3))
    if rank == 1:
        send_header(result, control, dst=0)
        send_tensors(result.tensors, {"latent": latent}, data, dst=0)
    else:
        got = recv_header(control, src=1, expect=ChunkResult, timeout_s=10)
        got.expect_reply_to(MESSAGES[2])
        check_specs("ChunkResult", [LATENT], got.tensors)
        received = recv_tensors(got.tensors, data, src=1, timeout_s=10).wait()
        assert torch.equal(received["latent"], latent)


def test_send_and_recv_deliver_a_result_intact(tmp_path) -> None:
    run_world(_p2p_round_trip, 2, tmp_path)


def _wrong_kind(rank: int, world: int) -> None:
    control = dist.new_group(backend="gloo")
    if rank == 1:
        send_header(WorkerFailed(rank=1, error="boom"), control, dst=0)
    else:
        with pytest.raises(WireError, match=r"expected ChunkResult, received WorkerFailed"):
            recv_header(control, src=1, expect=ChunkResult, timeout_s=10)


def test_a_header_of_the_wrong_kind_is_rejected_by_the_receiver(tmp_path) -> None:
    run_world(_wrong_kind, 2, tmp_path)


def _silent_peer(rank: int, world: int) -> None:
    control = dist.new_group(backend="gloo")
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(PeerError, match=r"header from rank 1: nothing arrived within 0.5 s"):
            recv_header(control, src=1, expect=ChunkResult, timeout_s=0.5)
        assert time.monotonic() - start < 3.0
    dist.barrier()


def test_a_silent_peer_raises_peer_error_after_the_timeout(tmp_path) -> None:
    run_world(_silent_peer, 2, tmp_path)

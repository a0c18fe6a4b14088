"""ScoreRank in one process: the latents of direct StreamingDiT calls out; bad input refused."""

from __future__ import annotations

import pytest
import torch

from proto.chunk_specs import chunk_noise, chunk_request_specs, chunk_seed, session_open_specs
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest, SessionClose, SessionOpen, TensorSpec, WireError
from workers.audio import AudioConditioning, InfiniteTalkAudio, face_token_mask
from workers.factory import build_score_model
from workers.score_rank import ScoreRank
from workers.streaming import StreamingDiT

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

CFG = get_model_preset("tiny")
STREAM = StreamConfig(height=64, width=64)
CHARACTERS = 2
BOXES = torch.tensor([[0.0, 0.0, 0.5, 0.75], [0.5, 0.25, 1.0, 1.0]])


def session_inputs(seed: int = 11) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(CFG.text_len, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "face_boxes": BOXES.clone(),
    }


def chunk_inputs(index: int) -> tuple[tuple[tuple[bool, ...], ...], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + index)
    specs = chunk_request_specs(CFG, STREAM, CHARACTERS)
    tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    flags = torch.rand(CHARACTERS, STREAM.chunk_latent_frames, generator=gen) > 0.3
    speaking = tuple(tuple(bool(b) for b in row) for row in flags)
    return speaking, tensors


def open_message(session_id: str = "s1") -> SessionOpen:
    return SessionOpen(
        session_id,
        latent_height=STREAM.latent_height,
        latent_width=STREAM.latent_width,
        num_characters=CHARACTERS,
        tensors=session_open_specs(CFG, CHARACTERS),
    )


Tensors = dict[str, torch.Tensor]


def request(session_id: str, index: int, session_seed: int = 7) -> tuple[ChunkRequest, Tensors]:
    speaking, tensors = chunk_inputs(index)
    msg = ChunkRequest(
        session_id,
        chunk_index=index,
        speaking=speaking,
        noise_seed=chunk_seed(session_seed, index),
        tensors=chunk_request_specs(CFG, STREAM, CHARACTERS),
    )
    return msg, tensors


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_score_model("tiny", seed=2)


def test_score_rank_gives_the_latents_of_direct_streaming_calls(model) -> None:
    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message(), session_inputs())
    got = [rank.denoise(*request("s1", i)) for i in range(3)]
    rank.close_session(SessionClose("s1"))

    engine = StreamingDiT(model, STREAM)
    inputs = session_inputs()
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    face_mask = face_token_mask(BOXES, STREAM.token_height, STREAM.token_width, STREAM.chunk_latent_frames)
    for i in range(3):
        msg, tensors = request("s1", i)
        audio = AudioConditioning(
            features=tensors["audio"][None],
            speaking=torch.tensor(msg.speaking)[None],
            face_mask=face_mask[None].float(),
        )
        noise = chunk_noise(msg.noise_seed, STREAM.num_steps, STREAM.latent_chunk_shape)
        want = engine.denoise_chunk(state, i, y=tensors["y"], audio=audio, noise=noise)
        assert got[i].shape == (16, *STREAM.latent_chunk_shape[1:])
        assert torch.equal(got[i], want), f"chunk {i}"
    assert rank.sessions == {}


def test_sessions_are_independent(model) -> None:
    """Two interleaved sessions give what each gives alone."""
    alone = ScoreRank(model, STREAM)
    alone.open_session(open_message("a"), session_inputs(1))
    want = [alone.denoise(*request("a", i, session_seed=1)) for i in range(2)]

    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message("a"), session_inputs(1))
    rank.open_session(open_message("b"), session_inputs(2))
    got = []
    for i in range(2):
        got.append(rank.denoise(*request("a", i, session_seed=1)))
        rank.denoise(*request("b", i, session_seed=2))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert sorted(rank.sessions) == ["a", "b"]


def test_a_chunk_out_of_order_is_refused_naming_chunk_index(model) -> None:
    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message(), session_inputs())
    with pytest.raises(WireError, match=r"ChunkRequest.chunk_index: expected 0, received 1"):
        rank.denoise(*request("s1", 1))


def test_an_unknown_session_is_refused_naming_the_session(model) -> None:
    rank = ScoreRank(model, STREAM)
    with pytest.raises(WireError, match=r"ChunkRequest.session_id: 'nope' is not an open session"):
        rank.denoise(*request("nope", 0))
    with pytest.raises(WireError, match=r"SessionClose.session_id: 'nope'"):
        rank.close_session(SessionClose("nope"))


def test_a_wrongly_shaped_tensor_is_refused_naming_it(model) -> None:
    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message(), session_inputs())
    msg, tensors = request("s1", 0)
    bad = TensorSpec("y", (20, 3, 4, 4), "float32")
    msg = ChunkRequest("s1", 0, msg.speaking, msg.noise_seed, tensors=(bad, msg.tensors[1]))
    with pytest.raises(WireError, match=r"\['y'\].*shape: expected \(20, 3, 8, 8\), received \(20, 3, 4, 4"):
        rank.denoise(msg, tensors)


def test_speaking_flags_must_cover_every_character_and_frame(model) -> None:
    rank = ScoreRank(model, STREAM)
    rank.open_session(open_message(), session_inputs())
    msg, tensors = request("s1", 0)
    msg = ChunkRequest("s1", 0, msg.speaking[:1], msg.noise_seed, tensors=msg.tensors)
    with pytest.raises(WireError, match=r"speaking: expected 2 rows of 3 flags"):
        rank.denoise(msg, tensors)


def test_a_session_of_another_resolution_is_refused(model) -> None:
    rank = ScoreRank(model, STREAM)
    msg = SessionOpen("s1", latent_height=16, latent_width=8, num_characters=CHARACTERS,
                      tensors=session_open_specs(CFG, CHARACTERS))
    with pytest.raises(WireError, match=r"SessionOpen.latent_height: expected 8, received 16"):
        rank.open_session(msg, session_inputs())


def test_chunk_noise_depends_only_on_the_seed() -> None:
    a = chunk_noise(chunk_seed(7, 3), 2, (16, 3, 8, 8))
    assert torch.equal(a, chunk_noise(chunk_seed(7, 3), 2, (16, 3, 8, 8)))
    assert not torch.equal(a, chunk_noise(chunk_seed(7, 4), 2, (16, 3, 8, 8)))
    assert not torch.equal(a, chunk_noise(chunk_seed(8, 3), 2, (16, 3, 8, 8)))


# ---- the SoulX-LiveAct family: infinitetalk audio, one speaker, chunks of 6 then 8 latent frames ----------

LIVE = get_model_preset("soulx-liveact-tiny")
LIVE_STREAM = StreamConfig.for_schedule(LIVE.stream_schedule, height=64, width=64)


@pytest.fixture(scope="module")
def live_model():
    torch.set_num_threads(1)
    return build_score_model(LIVE.name, seed=2)


def live_open(session_id: str = "live", characters: int = 1) -> tuple[SessionOpen, Tensors]:
    gen = torch.Generator().manual_seed(21)
    specs = session_open_specs(LIVE, characters)
    tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    tensors["face_boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * characters)
    msg = SessionOpen(
        session_id,
        latent_height=LIVE_STREAM.latent_height,
        latent_width=LIVE_STREAM.latent_width,
        num_characters=characters,
        tensors=specs,
    )
    return msg, tensors


def live_request(index: int, specs_of: int | None = None) -> tuple[ChunkRequest, Tensors]:
    """Chunk `index`'s request (its tensors shaped as chunk `specs_of`'s, default its own)."""
    specs = chunk_request_specs(LIVE, LIVE_STREAM, 1, index if specs_of is None else specs_of)
    gen = torch.Generator().manual_seed(200 + index)
    tensors = {s.name: torch.randn(s.shape, generator=gen) for s in specs}
    speaking = ((True,) * LIVE_STREAM.frames_in_chunk(index),)
    return ChunkRequest("live", index, speaking, chunk_seed(9, index), tensors=specs), tensors


def test_score_rank_serves_the_liveact_family_chunk_by_chunk(live_model) -> None:
    """Per-chunk specs (6 latent / 21 video frames for chunk 0, then 8 / 32), the infinitetalk audio tensor
    as `InfiniteTalkAudio` windows (batch = the one character) starting the clip at chunk 0, the chunk's
    noise: the latents of direct engine calls."""
    rank = ScoreRank(live_model, LIVE_STREAM)
    msg, session = live_open()
    rank.open_session(msg, session)
    got = [rank.denoise(*live_request(i)) for i in range(4)]
    rank.close_session(SessionClose("live"))

    engine = StreamingDiT(live_model, LIVE_STREAM)
    state = engine.open_session(session["context"], session["clip_fea"])
    for i in range(4):
        msg, tensors = live_request(i)
        assert tensors["audio"].shape[:2] == (1, LIVE_STREAM.video_frames_in_chunk(i))
        audio = InfiniteTalkAudio(windows=tensors["audio"], starts_clip=i == 0)
        noise = chunk_noise(msg.noise_seed, LIVE_STREAM.num_steps, LIVE_STREAM.latent_shape(i))
        want = engine.denoise_chunk(state, i, y=tensors["y"], audio=audio, noise=noise)
        assert got[i].shape == LIVE_STREAM.latent_shape(i) == (16, 6 if i == 0 else 8, 8, 8)
        assert torch.equal(got[i], want), f"chunk {i}"


def test_the_liveact_family_is_one_speaker(live_model) -> None:
    rank = ScoreRank(live_model, LIVE_STREAM)
    with pytest.raises(WireError, match=r"'live'.num_characters: expected 1, received 2 .*infinitetalk"):
        rank.open_session(*live_open(characters=2))
    assert rank.sessions == {}


def test_liveact_chunks_are_checked_against_their_own_sizes(live_model) -> None:
    rank = ScoreRank(live_model, LIVE_STREAM)
    rank.open_session(*live_open())
    with pytest.raises(WireError, match=r"\['y'\].*expected \(20, 6, 8, 8\), received \(20, 8, 8, 8\)"):
        rank.denoise(*live_request(0, specs_of=1))
    msg, tensors = live_request(0)
    eight = ChunkRequest("live", 0, ((True,) * 8,), msg.noise_seed, tensors=msg.tensors)
    with pytest.raises(WireError, match=r"speaking: expected 1 rows of 6 flags"):
        rank.denoise(eight, tensors)
    rank.denoise(msg, tensors)
    with pytest.raises(WireError, match=r"\['y'\].*expected \(20, 8, 8, 8\), received \(20, 6, 8, 8\)"):
        rank.denoise(*live_request(1, specs_of=0))

"""StreamConfig (proto/stream_config.py): defaults, derived sizes and validation."""

import pytest

from proto.stream_config import StreamConfig


def test_defaults_are_the_talkingmachines_student():
    cfg = StreamConfig()
    assert (cfg.fps, cfg.chunk_latent_frames, cfg.denoising_steps) == (16, 3, (1000, 500))
    assert (cfg.timestep_shift, cfg.cache_mode, cfg.position_mode) == (5.0, "per-step", "window")
    assert cfg.train_latent_frames == 21


@pytest.mark.parametrize(("height", "width", "tokens"), [(512, 512, 1024), (480, 832, 1560), (64, 64, 16)])
def test_tokens_per_frame(height, width, tokens):
    cfg = StreamConfig(height=height, width=width)
    assert cfg.tokens_per_frame == tokens
    assert cfg.tokens_per_chunk == 3 * tokens


def test_latent_chunk_shape():
    assert StreamConfig(height=480, width=832).latent_chunk_shape == (16, 3, 60, 104)


def test_first_chunk_is_9_video_frames_then_12():
    cfg = StreamConfig()
    assert [cfg.video_frames_in_chunk(i) for i in range(3)] == [9, 12, 12]
    assert cfg.chunk_duration_s(1) == 0.75


def test_resolution_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match=r"StreamConfig.height=500 must be a positive multiple of 16"):
        StreamConfig(height=500)


def test_steps_must_decrease():
    with pytest.raises(ValueError, match="strictly decreasing"):
        StreamConfig(denoising_steps=(500, 1000))


def test_unknown_cache_mode_is_rejected():
    with pytest.raises(ValueError, match="cache_mode must be 'per-step' or 'clean-context'"):
        StreamConfig(cache_mode="rolling")  # type: ignore[arg-type]


def test_training_clip_must_hold_whole_chunks():
    with pytest.raises(
        ValueError, match="train_latent_frames=20 must be a multiple of chunk_latent_frames=3"
    ):
        StreamConfig(train_latent_frames=20)

"""The model families' stream schedules are data (proto.stream_config.STREAM_SCHEDULES)."""

from __future__ import annotations

import pytest

from proto.stream_config import StreamConfig
from workers.sampler import denoising_schedule


def test_the_talkingmachines_schedule_is_the_default_stream() -> None:
    stream = StreamConfig.for_schedule("talkingmachines", height=64, width=64)
    assert stream == StreamConfig(height=64, width=64)
    assert [stream.frames_in_chunk(i) for i in range(3)] == [3, 3, 3]
    assert [stream.video_frames_in_chunk(i) for i in range(3)] == [9, 12, 12]
    assert [stream.first_video_frame(i) for i in range(4)] == [0, 9, 21, 33]


def test_the_liveact_schedule_is_upstreams_chunks_timesteps_and_fps() -> None:
    stream = StreamConfig.for_schedule("soulx-liveact", height=512, width=512)
    # generate.py: blksz_lst = [6, 8]; 21 then 32 video frames; --fps 24.
    assert [stream.frames_in_chunk(i) for i in range(3)] == [6, 8, 8]
    assert [stream.video_frames_in_chunk(i) for i in range(3)] == [21, 32, 32]
    assert [stream.first_video_frame(i) for i in range(4)] == [0, 21, 53, 85]
    assert stream.latent_shape(0) == (16, 6, 64, 64) and stream.latent_shape(5) == (16, 8, 64, 64)
    assert stream.fps == 24 and stream.chunk_duration_s(1) == pytest.approx(32 / 24)
    # timesteps = [1000.0, 937.5, 833.33333333, 0.0], sigma = t / 1000
    timesteps, sigmas = denoising_schedule(
        stream.denoising_steps, stream.timestep_shift, stream.warp_denoising_steps
    )
    assert timesteps == pytest.approx((1000.0, 937.5, 833.33333333))
    assert sigmas == pytest.approx((1.0, 0.9375, 0.83333333333))
    assert stream.audio_from_step == 1 and stream.audio_cfg == 1.0 and stream.window == "convkv-memory"


def test_a_schedule_takes_overrides_and_refuses_what_its_window_cannot_hold() -> None:
    assert StreamConfig.for_schedule("soulx-liveact", fps=20).fps == 20
    assert StreamConfig.for_schedule("soulx-liveact", audio_cfg=2.5).audio_cfg == 2.5
    with pytest.raises(ValueError, match=r"convkv-memory.*LiveAct's layout"):
        StreamConfig.for_schedule("soulx-liveact", chunk_latent_frames=3)
    with pytest.raises(ValueError, match="only in the 'convkv-memory' window"):
        StreamConfig(first_chunk_latent_frames=6)
    with pytest.raises(ValueError, match="audio_from_step"):
        StreamConfig(audio_from_step=2)
    with pytest.raises(ValueError, match="unknown stream schedule 'nope'"):
        StreamConfig.for_schedule("nope")


def test_the_wire_specs_follow_the_schedules_chunk_sizes_and_the_audio_variant() -> None:
    from proto.chunk_specs import chunk_request_specs, chunk_result_specs
    from proto.model_config import get_model_preset

    model = get_model_preset("soulx-liveact-tiny")
    assert model.stream_schedule == "soulx-liveact"
    stream = StreamConfig.for_schedule(model.stream_schedule, height=32, width=32)
    a = model.audio
    first = {s.name: s.shape for s in chunk_request_specs(model, stream, 1, chunk_index=0)}
    later = {s.name: s.shape for s in chunk_request_specs(model, stream, 1, chunk_index=4)}
    assert first == {"y": (20, 6, 4, 4), "audio": (1, 21, a.audio_window, a.wav2vec_layers, a.wav2vec_dim)}
    assert later == {"y": (20, 8, 4, 4), "audio": (1, 32, a.audio_window, a.wav2vec_layers, a.wav2vec_dim)}
    assert chunk_result_specs(stream, 0)[0].shape == (16, 6, 4, 4)
    assert chunk_result_specs(stream, 1)[0].shape == (16, 8, 4, 4)

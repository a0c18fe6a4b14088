"""``run``'s master for the SoulX-LiveAct family, in-process with a scripted score side: the chunks it
prepares (the schedule's per-chunk wire specs, upstream's y slices and audio windows), the 6-then-8 latent
decode and the MP4 at 24 fps with 48 kHz audio. The end-to-end runs with the real score workers are in
tests/runtime/test_liveact_run.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from run_helpers import write_inputs

from decoder.encode import I2VConditioning
from engine.executor import ScoredChunk
from engine.file_stream import FrameChunkScheduler, RunSession, run_stream
from engine.session_open import reference_image
from engine.stats import StreamStats
from frontends.audio_io import load_audio
from frontends.image_io import load_image
from proto.chunk_specs import chunk_request_specs
from proto.wire import ChunkRequest, TensorSpec, check_specs
from server.master import build_master_vae, build_scheduler
from server.publishers.file import Mp4FilePublisher
from server.run_options import parse_run_options

AUDIO_S = 2.5  # 60 frames at 24 fps: 3 chunks (21 + 32 + 32 = 85 frames)


class _ScriptedScoreSide:
    """Checks each request against the schedule's specs and answers a seeded latent of the chunk's size."""

    def __init__(self, options) -> None:
        self.model, self.stream = options.model_config, options.stream_config()
        self.requests: list[tuple[ChunkRequest, dict[str, torch.Tensor]]] = []
        self.latents: list[torch.Tensor] = []

    def submit(self, request: ChunkRequest, tensors: dict[str, torch.Tensor]) -> None:
        specs = chunk_request_specs(self.model, self.stream, 1, request.chunk_index)
        check_specs("request", specs, tuple(TensorSpec.of(n, t) for n, t in tensors.items()))
        self.requests.append((request, tensors))

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        generator = torch.Generator().manual_seed(request.chunk_index)
        latent = torch.randn(self.stream.latent_shape(request.chunk_index), generator=generator)
        self.latents.append(latent)
        return ScoredChunk(request, latent, score_s=0.0, roundtrip_s=0.0)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("liveact")
    image_path, audio_path = write_inputs(folder, AUDIO_S)
    out = folder / "out.mp4"
    argv = ["--image", str(image_path), "--audio", str(audio_path), "--out", str(out)]
    preset = ("--preset", "soulx-liveact-tiny", "--random-weights", "--device", "cpu")
    options = parse_run_options([*argv, *preset])
    model, stream = options.model_config, options.stream_config()
    device = torch.device("cpu")
    vae = build_master_vae(options, device)
    image = reference_image(model, stream, load_image(image_path))
    conditioning = I2VConditioning.for_stream(vae, image, stream)
    audio = load_audio(audio_path)
    scheduler = build_scheduler(options, model, stream, conditioning, audio)
    score = _ScriptedScoreSide(options)
    publisher = Mp4FilePublisher(out, width=32, height=32, fps=24, sample_rate=48_000)
    session = RunSession(scheduler, options.decode_options().session(vae, 32, 32), publisher)
    stats = StreamStats("scripted", stream.chunk_duration_s(1))
    run_stream(score, session, stream, stats, overlap=True, device=device)  # type: ignore[arg-type]
    publisher.close()
    return options, scheduler, score, conditioning, stats, out, audio_path


def test_the_liveact_schedule_s_chunks_carry_its_specs_y_slices_and_audio_windows(ran) -> None:
    _, scheduler, score, conditioning, _, _, _ = ran
    assert isinstance(scheduler, FrameChunkScheduler)
    assert scheduler.num_chunks == 3 and scheduler.total_frames == 60
    assert [r.chunk_index for r, _ in score.requests] == [0, 1, 2]
    for request, tensors in score.requests:
        c = request.chunk_index
        assert tensors["audio"].shape == (1, 21 if c == 0 else 32, 5, 2, 32)
        assert len(request.speaking[0]) == (6 if c == 0 else 8)
        expected = conditioning.clip[:, 0:6] if c == 0 else conditioning.clip[:, 6:14]
        assert torch.equal(tensors["y"], expected)
    # the reference frame's latent, masked on its 4 channels only
    assert conditioning.clip.shape == (20, 14, 4, 4) and conditioning.clip[:4, 0].eq(1).all()
    assert conditioning.clip[:4, 1:].eq(0).all()


def test_the_mp4_is_24_fps_whole_chunks_with_the_audio_in_sync(ran) -> None:
    _, _, _, _, stats, out, audio_path = ran
    assert [c.frames for c in stats.chunks] == [21, 32, 32]
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.average_rate == 24
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        audio_duration = float(stream.duration * stream.time_base)
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert frames == 21 + 32 * 2
    assert rate == 48_000
    assert abs(audio_duration - frames / 24) < 1e-3  # the audio is padded with silence to the video's end
    original, original_rate = sf.read(str(audio_path))
    expected_rms = np.sqrt(np.mean(original.mean(axis=1)[:original_rate] ** 2))
    assert np.sqrt(np.mean(pcm[:rate] ** 2)) == pytest.approx(expected_rms, rel=0.1)
    assert math.isclose(np.abs(pcm[round(2.6 * rate) :]).max(), 0.0, abs_tol=0.02)  # silence after 2.5 s


def test_run_refuses_chunk_frames_for_the_liveact_schedule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whose chunks are fixed"):
        parse_run_options(
            ["--image", "a.png", "--audio", "a.wav", "--out", str(tmp_path / "x.mp4"), "--preset",
             "soulx-liveact-tiny", "--random-weights", "--device", "cpu", "--chunk-frames", "3"]
        )  # fmt: skip


def test_each_chunk_s_ttbc_budget_is_the_duration_of_the_chunk_playing_before_it(ran) -> None:
    _, _, _, _, stats, _, _ = ran
    assert [c.deadline_s for c in stats.chunks] == [21 / 24, 21 / 24, 32 / 24]
    assert stats.chunk_duration_s == 32 / 24  # the steady-state line
    late = dataclasses.replace(stats.chunks[1], ttbc_s=1.0)  # over chunk 0's 0.875 s, under 1.33 s
    on_time = dataclasses.replace(stats.chunks[2], ttbc_s=1.0)
    summary = StreamStats("x", stats.chunk_duration_s)
    for chunk in (stats.chunks[0], late, on_time):
        summary.add(chunk)
    assert summary.summary()["deadline_misses"] == 1

"""``talkingmachines run`` end to end: real process worlds (gloo, tiny preset, 32x32), video and audio;
and run's stream through the engine in-process with a scripted score side, decoder and sink."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from run_helpers import assert_frames_match, read_frames, run_cli, write_inputs

from engine.chunks import PreparedInputs
from engine.executor import ScoredChunk
from engine.file_stream import RunSession, run_stream
from engine.stats import StreamStats
from proto.stream_config import StreamConfig
from proto.wire import ChunkRequest

SIZE = ("--resolution", "32x32")
AUDIO_S = 1.4  # 23 frames: 3 chunks (9 + 12 + 12 frames), so chunk 2 attends to c_0 and c_1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"), AUDIO_S)


def _run(inputs: tuple[Path, Path], folder: Path, name: str, *topology: str) -> tuple[np.ndarray, Path]:
    image, audio = inputs
    out, frames = folder / f"{name}.mp4", folder / f"{name}.u8"
    result = run_cli(image, audio, out, *SIZE, "--seed", "7", "--save-frames", str(frames), *topology)
    assert result.returncode == 0, result.stderr
    return read_frames(frames, 32, 32), out


@pytest.fixture(scope="module")
def self_contained_1(inputs, tmp_path_factory) -> tuple[np.ndarray, Path]:
    return _run(inputs, tmp_path_factory.mktemp("sc1"), "sc1", "--decoder", "colocated")


@pytest.fixture(scope="module")
def disaggregated_2(inputs, tmp_path_factory) -> tuple[np.ndarray, Path]:
    return _run(inputs, tmp_path_factory.mktemp("dis2"), "dis2", "--score-workers", "2")


@pytest.mark.slow
@pytest.mark.equality
def test_disaggregated_1_plus_1_gives_the_same_frames_as_self_contained_1(
    inputs, self_contained_1, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "dis1", "--score-workers", "1", "--decoder", "dedicated")
    assert frames.shape == (23, 32, 32, 3)
    assert frames.std() > 5  # random weights give visible noise, not a constant picture
    assert_frames_match(frames, self_contained_1[0])


@pytest.mark.slow
@pytest.mark.equality
def test_vae_channels_last_whole_chunk_decode_gives_the_same_frames_as_the_default_decode(
    inputs, self_contained_1, tmp_path
) -> None:
    # The --vae-* options reach run's decoder (and the I2V encode, which shares the channels-last VAE): the
    # layout and one decoder call per chunk change float rounding only, at most one level here.
    options = ("--decoder", "colocated", "--vae-channels-last", "--vae-chunk-at-once")
    frames, _ = _run(inputs, tmp_path, "vae_options", *options)
    assert frames.shape == self_contained_1[0].shape
    diff = np.abs(frames.astype(np.int16) - self_contained_1[0].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


@pytest.mark.slow
@pytest.mark.equality
def test_disaggregated_2_plus_1_gives_the_same_frames_as_self_contained_2(
    inputs, disaggregated_2, tmp_path
) -> None:
    frames, _ = _run(inputs, tmp_path, "sc2", "--score-workers", "2", "--decoder", "colocated")
    assert_frames_match(disaggregated_2[0], frames)


@pytest.mark.slow
@pytest.mark.equality
def test_disaggregated_2_plus_1_gives_the_same_frames_as_self_contained_1(
    self_contained_1, disaggregated_2
) -> None:
    # Ulysses attends over the keys in the single-worker order, so the latents agree to float32 rounding.
    assert disaggregated_2[0].shape == (23, 32, 32, 3)
    assert_frames_match(disaggregated_2[0], self_contained_1[0])


@pytest.mark.slow
def test_the_mp4_has_the_input_audio_in_sync_at_16_fps(inputs, disaggregated_2) -> None:
    _, audio_path = inputs
    duration = sf.info(str(audio_path)).duration
    with av.open(str(disaggregated_2[1])) as container:
        video = container.streams.video[0]
        assert video.average_rate == 16
        assert (video.codec_context.width, video.codec_context.height) == (32, 32)
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(disaggregated_2[1])) as container:
        stream = container.streams.audio[0]
        audio_duration = float(stream.duration * stream.time_base)
        samples = [f.to_ndarray()[0] for f in container.decode(audio=0)]
        rate = stream.rate
    pcm = np.concatenate(samples)
    assert frames == math.ceil(duration * 16)
    assert abs(frames / 16 - duration) <= 1 / 16
    assert abs(audio_duration - duration) <= 1 / 16
    assert abs(audio_duration - frames / 16) < 1e-3  # audio and video end together
    assert 0 <= pcm.size - frames * rate // 16 < 1024  # decoders add at most one AAC frame of padding
    # The audio is the input's (AAC is lossy: compare loudness over the first second, where it is a tone).
    original, original_rate = sf.read(str(audio_path))
    assert original_rate == 22_050
    expected_rms = np.sqrt(np.mean(original.mean(axis=1)[:original_rate] ** 2))
    assert np.sqrt(np.mean(pcm[:rate] ** 2)) == pytest.approx(expected_rms, rel=0.1)


@pytest.mark.slow
def test_a_20_chunk_run_keeps_master_and_worker_memory_flat(tmp_path) -> None:
    image, audio = write_inputs(tmp_path, (12 * 20 - 3.5) / 16)  # 237 frames: 9 + 19 x 12
    stats_path = tmp_path / "stats.json"
    result = run_cli(
        image,
        audio,
        tmp_path / "long.mp4",
        *SIZE,
        "--score-workers",
        "2",
        "--stats-json",
        str(stats_path),
        "--quiet",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["summary"]["chunks"] == 20
    growth = stats["summary"]["rss_growth_after_chunk_3"]
    assert sorted(growth) == ["0", "1", "2"]  # the master and both workers were measured
    assert all(g <= 0.05 for g in growth.values()), growth


# ---- the master's pipeline in-process, with a scripted score side, decoder and sink ----------------------


class _ScriptedExecutor:
    """Scores instantly: the latent of chunk i is filled with i."""

    def __init__(self) -> None:
        self._pending: list[ChunkRequest] = []

    def submit(self, request: ChunkRequest, tensors: dict[str, torch.Tensor]) -> None:
        self._pending.append(request)

    def collect(self, request: ChunkRequest) -> ScoredChunk:
        assert self._pending.pop(0) is request
        latent = torch.full((16, 3, 2, 2), float(request.chunk_index))
        return ScoredChunk(request, latent, score_s=0.0, roundtrip_s=0.0)


class _StampDecoder:
    """Decodes a latent to 2 frames of 1x1 pixels holding the chunk index; records the order of decodes."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.decoded: list[int] = []

    def decode_chunk(self, latent: torch.Tensor) -> torch.Tensor:
        index = int(latent[0, 0, 0, 0])
        self.decoded.append(index)
        return torch.full((2, 1, 1, 3), index, dtype=torch.uint8)


class _Scheduler:
    """What ``RunSession`` takes of a ``ChunkScheduler``: chunk i's pcm is two samples holding i."""

    session_id = "s"
    samples_per_frame = 1

    def __init__(self, count: int) -> None:
        self.num_chunks = count

    def __iter__(self):
        for i in range(self.num_chunks):
            request = ChunkRequest("s", i, speaking=(), noise_seed=i)
            yield PreparedInputs(request, {}, np.full(2, i, np.float32), first_frame=2 * i)


def _run_stream(decoder, sink, count: int, stats: StreamStats) -> None:
    session = RunSession(_Scheduler(count), decoder, sink)  # type: ignore[arg-type]
    run_stream(_ScriptedExecutor(), session, StreamConfig(height=32, width=32), stats, overlap=True,
               device=torch.device("cpu"))  # fmt: skip


def test_the_engine_publishes_every_chunk_of_a_run_in_order_with_its_timing() -> None:
    written: list[tuple[np.ndarray, np.ndarray]] = []

    class Sink:
        def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
            written.append((frames.copy(), audio.copy()))

    stats = StreamStats("test", 0.75)
    _run_stream(_StampDecoder(), Sink(), 6, stats)
    assert [int(frames[0, 0, 0, 0]) for frames, _ in written] == list(range(6))
    assert [audio.tolist() for _, audio in written] == [[i, i] for i in range(6)]
    assert [c.chunk_index for c in stats.chunks] == list(range(6))
    assert all(c.publish_s >= 0 and c.decode_s >= 0 and c.frames == 2 for c in stats.chunks)
    assert stats.chunks[0].ttbc_s is None and all(c.ttbc_s is not None for c in stats.chunks[1:])


def test_the_engine_decodes_the_next_chunk_while_one_is_being_published() -> None:
    decoder = _StampDecoder()

    class SlowSink:
        """Publishing chunk i waits until chunk i + 1 has been decoded: only possible off the decode path."""

        def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
            index = int(frames[0, 0, 0, 0])
            deadline = time.monotonic() + 10
            while index + 1 < 4 and index + 1 not in decoder.decoded:
                assert time.monotonic() < deadline, f"chunk {index + 1} not decoded while {index} published"
                time.sleep(0.001)

    stats = StreamStats("test", 0.75)
    _run_stream(decoder, SlowSink(), 4, stats)
    assert [c.chunk_index for c in stats.chunks] == [0, 1, 2, 3]


def test_a_sink_error_ends_the_run_with_that_error() -> None:
    decoder = _StampDecoder()

    class FailingSink:
        def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
            if frames[0, 0, 0, 0] == 2:
                raise OSError("disk full while writing chunk 2")

    stats = StreamStats("test", 0.75)
    with pytest.raises(RuntimeError, match="disk full while writing chunk 2"):
        _run_stream(decoder, FailingSink(), 50, stats)
    assert [c.chunk_index for c in stats.chunks] == [0, 1]
    assert len(decoder.decoded) < 50  # the decoder stopped soon after, it did not run the stream out

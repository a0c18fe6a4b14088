"""server.publishers.file: the MP4 (H.264 + AAC) publisher, read back with PyAV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from server.publishers import Mp4FilePublisher

FPS, RATE, SPF = 16, 16_000, 1000
W, H = 64, 48


@dataclass(frozen=True)
class Mp4Info:
    frames: int
    fps: float
    width: int
    height: int
    video_codec: str
    pix_fmt: str
    audio_codec: str
    audio_rate: int
    audio_duration_s: float  # from the audio stream's (edit-list trimmed) duration
    decoded_audio: np.ndarray  # [N] float32, every decoded sample (AAC pads the last 1024-sample frame)
    first_frame_means: np.ndarray  # [T, 3] mean RGB of each decoded frame


def read_mp4(path: Path) -> Mp4Info:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        means = np.stack(
            [f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for f in container.decode(video)]
        )
        info = (
            float(video.average_rate),
            video.width,
            video.height,
            video.codec_context.name,
            video.codec_context.pix_fmt,
            audio.codec_context.name,
            audio.rate,
            float(audio.duration * audio.time_base),
        )
    with av.open(str(path)) as container:
        pcm = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    fps, width, height, vcodec, pix_fmt, acodec, rate, duration = info
    return Mp4Info(len(means), fps, width, height, vcodec, pix_fmt, acodec, rate, duration, pcm, means)


def _chunks(n_chunks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Chunks of 9, then 12 frames (as the stream produces); frame i is a flat grey of level 8*i, audio is
    a 440 Hz tone."""
    frames, audio, start = [], [], 0
    for c in range(n_chunks):
        n = 9 if c == 0 else 12
        levels = 8 * np.arange(start, start + n) % 256
        frames.append(np.broadcast_to(levels[:, None, None, None], (n, H, W, 3)).astype(np.uint8))
        t = np.arange(start * SPF, (start + n) * SPF) / RATE
        audio.append((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
        start += n
    return frames, audio


def _write(path: Path, frames: list[np.ndarray], audio: list[np.ndarray]) -> None:
    with Mp4FilePublisher(path, width=W, height=H, fps=FPS, sample_rate=RATE) as publisher:
        for f, a in zip(frames, audio, strict=True):
            publisher.write(f, a)


def test_mp4_has_every_frame_at_16_fps_with_h264_and_aac(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    frames, audio = _chunks(3)
    _write(path, frames, audio)
    info = read_mp4(path)
    assert info.frames == 33
    assert info.fps == 16.0
    assert (info.width, info.height) == (W, H)
    assert (info.video_codec, info.pix_fmt, info.audio_codec, info.audio_rate) == (
        "h264",
        "yuv420p",
        "aac",
        RATE,
    )


def test_frames_come_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    frames, audio = _chunks(2)
    _write(path, frames, audio)
    levels = read_mp4(path).first_frame_means[:, 0]
    np.testing.assert_allclose(levels, 8 * np.arange(21), atol=3)


def test_audio_duration_matches_the_input_within_one_frame(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    frames, audio = _chunks(3)
    _write(path, frames, audio)
    info = read_mp4(path)
    seconds = sum(a.size for a in audio) / RATE
    assert abs(info.audio_duration_s - seconds) <= 1 / FPS
    assert abs(info.decoded_audio.size / RATE - seconds) <= 1 / FPS


def test_audio_is_not_delayed_by_the_aac_priming(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    n = 32
    audio = np.zeros(n * SPF, dtype=np.float32)
    audio[8 * SPF : 10 * SPF] = 0.5  # a burst that starts with video frame 8
    with Mp4FilePublisher(path, width=W, height=H) as publisher:
        publisher.write(np.zeros((n, H, W, 3), dtype=np.uint8), audio)
    decoded = read_mp4(path).decoded_audio
    onset = int(np.argmax(np.abs(decoded) > 0.25))
    assert abs(onset - 8 * SPF) <= 16  # 1 ms


def test_audio_length_must_match_the_frames(tmp_path: Path) -> None:
    with (
        Mp4FilePublisher(tmp_path / "out.mp4", width=W, height=H) as publisher,
        pytest.raises(ValueError, match=r"3 frames need exactly 3000 audio samples .* got shape \[2999\]"),
    ):
        publisher.write(np.zeros((3, H, W, 3), dtype=np.uint8), np.zeros(2999, dtype=np.float32))


def test_frame_size_must_match_the_publisher(tmp_path: Path) -> None:
    with (
        Mp4FilePublisher(tmp_path / "out.mp4", width=W, height=H) as publisher,
        pytest.raises(ValueError, match=r"frames must be uint8 \[T, 48, 64, 3\]"),
    ):
        publisher.write(np.zeros((1, 32, 32, 3), dtype=np.uint8), np.zeros(SPF, dtype=np.float32))


def test_odd_frame_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be positive and even"):
        Mp4FilePublisher(tmp_path / "out.mp4", width=63, height=48)


def test_write_after_close_is_an_error(tmp_path: Path) -> None:
    publisher = Mp4FilePublisher(tmp_path / "out.mp4", width=W, height=H)
    publisher.write(np.zeros((1, H, W, 3), dtype=np.uint8), np.zeros(SPF, dtype=np.float32))
    written = publisher.close()
    assert (written.frames, written.audio_samples) == (1, SPF)
    with pytest.raises(RuntimeError, match="is closed"):
        publisher.write(np.zeros((1, H, W, 3), dtype=np.uint8), np.zeros(SPF, dtype=np.float32))


def _top_level_boxes(path: Path) -> list[str]:
    data, boxes, i = path.read_bytes(), [], 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i : i + 4], "big")
        boxes.append(data[i + 4 : i + 8].decode("latin-1"))
        i += max(size, 8)
    return boxes


def test_the_file_plays_while_it_is_being_written(tmp_path: Path) -> None:
    """What a kill would leave: every fragment cut so far is in the file and decodes (a plain MP4 has no
    index before close())."""
    path = tmp_path / "out.mp4"
    frames, audio = _chunks(6)  # 69 frames, 4.3 s
    publisher = Mp4FilePublisher(path, width=W, height=H, fps=FPS, sample_rate=RATE)
    try:
        for f, a in zip(frames, audio, strict=True):
            publisher.write(f, a)
        info = read_mp4(path)
        assert 69 - FPS - 14 <= info.frames < 69  # lost: the open fragment and the encoder's look-ahead
        # In order; the last ones may skip a B-frame whose packet falls in the next (unwritten) fragment.
        levels = info.first_frame_means[: info.frames - 2, 0]
        np.testing.assert_allclose(levels, 8 * np.arange(levels.size) % 256, atol=3)
        assert "moof" in _top_level_boxes(path)
    finally:
        publisher.close()


def test_a_closed_file_is_an_ordinary_mp4_with_nothing_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    frames, audio = _chunks(6)
    _write(path, frames, audio)
    boxes = _top_level_boxes(path)
    assert "moov" in boxes and "moof" not in boxes and "mfra" not in boxes, boxes
    assert read_mp4(path).frames == 69
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]

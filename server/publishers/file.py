"""MP4 file publisher: H.264 (yuv420p) video + AAC audio through PyAV, written chunk by chunk.

Sync is by construction: every video frame arrives with exactly `sample_rate / fps` audio samples
(1000 at 16 kHz, 16 fps), video frame `i` has pts `i / fps` s and its audio starts at sample
`i * sample_rate / fps`. AAC consumes 1024-sample frames, so audio goes through a FIFO and is
re-framed; the tail is flushed at `close()`.

Crash safety: while it is written the file is a fragmented MP4 (an `moov` with the tracks' set-up, then one
`moof` + `mdat` fragment per `FRAGMENT_S` of media), and every fragment reaches the kernel as soon as it is
cut (`flush_packets`), so a process killed at any moment (SIGKILL, OOM, power to the container) leaves a
file that plays up to its last whole fragment: what is lost is the fragment being filled plus the frames
inside the H.264 encoder's look-ahead, about 1-2 s. A plain MP4 keeps its only index (`moov`) in memory
until `close()`, so a kill left a 48-byte file and the whole recording was lost.

`close()` then rewrites the fragments as an ordinary MP4 (stream copy, no re-encode, into a temporary file
beside it that replaces the original atomically), because readers derive durations from fragments without
the edit list that trims the AAC encoder's priming: the stream would report 64 ms more audio than video.
A kill during that rewrite leaves the complete fragmented file in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from frontends.audio_io import TARGET_SAMPLE_RATE

log = logging.getLogger(__name__)

FRAGMENT_S = 1.0  # media per fragment: at most this much (plus the encoder's look-ahead) is lost to a kill
# empty_moov + delay_moov: the track set-up goes first, written once the first fragment is cut (so the
# muxer knows the AAC priming and writes its edit list); default_base_moof: fragments self-contained.
_FRAGMENTED_MP4 = {
    "movflags": "empty_moov+delay_moov+default_base_moof",
    "frag_duration": str(int(FRAGMENT_S * 1_000_000)),  # microseconds; cuts regardless of keyframes
    "flush_packets": "1",  # each fragment goes to the file when it is cut, not when the 32 KiB buffer fills
}


@dataclass(frozen=True)
class PublishedFile:
    """What `Mp4FilePublisher.close()` wrote."""

    path: Path
    frames: int
    audio_samples: int
    fps: int
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


class Mp4FilePublisher:
    """Writes an MP4 from (frames, audio) chunks.

    Args:
        path: output file (parent directory must exist).
        width, height: frame size in pixels; both even (yuv420p halves chroma).
        fps: video frame rate (16 for the TalkingMachines student).
        sample_rate: audio rate in Hz of the audio passed to `write` (16 kHz from the front-end).
        crf: x264 constant rate factor (lower = better quality, larger file).
        preset: x264 speed preset.
        audio_bitrate: AAC bit rate in bit/s.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: int = 16,
        sample_rate: int = TARGET_SAMPLE_RATE,
        crf: int = 20,
        preset: str = "veryfast",
        audio_bitrate: int = 64_000,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"frame size {width}x{height} must be positive and even for H.264 yuv420p")
        if fps <= 0 or sample_rate % fps:
            raise ValueError(
                f"fps={fps} must divide the audio rate {sample_rate} Hz so each frame has whole samples"
            )
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"output directory {str(self.path.parent)!r} does not exist — create it first"
            )
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self.samples_per_frame = sample_rate // fps
        self._container = av.open(str(self.path), mode="w", format="mp4", options=dict(_FRAGMENTED_MP4))
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.time_base = Fraction(1, fps)
        self._video.options = {"crf": str(crf), "preset": preset}
        self._audio = self._container.add_stream("aac", rate=sample_rate)
        self._audio.layout = "mono"
        self._audio.bit_rate = audio_bitrate
        self._audio.time_base = Fraction(1, sample_rate)
        self._fifo = av.AudioFifo()
        self._frames = 0
        self._audio_samples = 0
        self._audio_encoded = 0
        self._closed = False

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """Append video frames and their audio.

        Args:
            frames: `[T, H, W, 3]` uint8 RGB.
            audio: `[T * samples_per_frame]` float32 mono in [-1, 1] at `sample_rate`; frame `t` plays
                `audio[t * spf : (t + 1) * spf]`.
        """
        if self._closed:
            raise RuntimeError(f"publisher for {str(self.path)!r} is closed")
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [T, {self.height}, {self.width}, 3], "
                f"got {frames.dtype} {list(frames.shape)}"
            )
        expected = frames.shape[0] * self.samples_per_frame
        if audio.ndim != 1 or audio.shape[0] != expected:
            raise ValueError(
                f"{frames.shape[0]} frames need exactly {expected} audio samples "
                f"({self.samples_per_frame} per frame at {self.sample_rate} Hz, {self.fps} fps), "
                f"got shape {list(audio.shape)} — pad the last frame's audio with zeros"
            )
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self._frames
            self._container.mux(self._video.encode(frame))
            self._frames += 1
        pcm = np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0)[None, :]
        audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout="mono")
        audio_frame.sample_rate = self.sample_rate
        self._fifo.write(audio_frame)
        self._audio_samples += pcm.shape[1]
        self._drain_audio(final=False)

    def _drain_audio(self, *, final: bool) -> None:
        frame_size = self._audio.codec_context.frame_size or 1024
        while self._fifo.samples >= frame_size or (final and self._fifo.samples > 0):
            chunk = self._fifo.read(min(frame_size, self._fifo.samples))
            # The FIFO drops timestamps; without them the muxer cannot write the edit list that trims
            # the AAC encoder's 1024 priming samples, and the audio would play 64 ms late.
            chunk.pts = self._audio_encoded
            chunk.time_base = self._audio.time_base
            self._audio_encoded += chunk.samples
            self._container.mux(self._audio.encode(chunk))

    def close(self) -> PublishedFile:
        """Flush both encoders, write the last fragment and rewrite the file as an ordinary MP4
        (idempotent). If the rewrite fails, the fragmented file stays: playable, only its reported audio
        duration includes the AAC priming."""
        if not self._closed:
            self._closed = True
            try:
                self._drain_audio(final=True)
                self._container.mux(self._audio.encode(None))
                self._container.mux(self._video.encode(None))
            finally:
                self._container.close()
            if self._frames:
                try:
                    defragment(self.path)
                except (OSError, av.FFmpegError):
                    log.exception("could not rewrite %s as a plain MP4; the fragmented one stays", self.path)
        return PublishedFile(self.path, self._frames, self._audio_samples, self.fps, self.sample_rate)

    def __enter__(self) -> Mp4FilePublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def defragment(path: Path) -> None:
    """Rewrite the fragmented MP4 at ``path`` as an ordinary one (``moov`` with full sample tables, at the
    end as before): a stream copy into ``.NAME.defrag`` beside it, then an atomic rename over ``path``."""
    tmp = path.with_name(f".{path.name}.defrag")
    try:
        with av.open(str(path)) as source, av.open(str(tmp), mode="w", format="mp4") as target:
            streams = {s.index: target.add_stream_from_template(s) for s in source.streams}
            for packet in source.demux():
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.stream = streams[packet.stream_index]
                target.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

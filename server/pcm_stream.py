"""Raw PCM ingest: int16 bytes → float32 samples, and streaming resampling to 16 kHz.

Streamed audio (WebSocket frames) must not be resampled frame by frame: each call of ``audio_io.resample``
treats the frame's edges as silence, which would click at every frame boundary. ``StreamResampler`` instead
keeps the filter's context across frames and emits each output sample once all input it depends on has
arrived, so the concatenated output equals one ``resample`` of the whole stream (up to float rounding).
"""

from __future__ import annotations

import math

import numpy as np

from frontends.audio_io import RESAMPLER_ROLLOFF, RESAMPLER_ZERO_CROSSINGS, TARGET_SAMPLE_RATE, resample


class PcmFormatError(ValueError):
    """Raw PCM bytes that do not form whole int16 samples of the declared channel count."""


def decode_pcm16(data: bytes, channels: int = 1) -> np.ndarray:
    """Little-endian int16 interleaved PCM → ``[N]`` float32 mono in [-1, 1) (channels averaged).

    Raises:
        PcmFormatError: the byte count is not a whole number of ``2 * channels``-byte frames.
    """
    if channels < 1:
        raise PcmFormatError(f"channel count must be at least 1, got {channels}")
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise PcmFormatError(
            f"{len(data)} bytes of int16 PCM is not a whole number of {channels}-channel samples "
            f"({frame_bytes} bytes each) — send little-endian int16, interleaved"
        )
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1, dtype=np.float32) if channels > 1 else samples


class StreamResampler:
    """Resample a mono stream pushed in arbitrary pieces to 16 kHz.

    Output sample ``n`` (time ``n / 16000`` s) depends on input within ``half_width`` input samples of it; it
    is emitted once that input has arrived. ``flush`` ends the stream (silence after it, as ``resample``
    assumes), so the total output length is ``ceil(N * 16000 / rate)``.
    """

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate} Hz")
        self.rate = rate
        g = math.gcd(rate, TARGET_SAMPLE_RATE)
        self._up, self._down = TARGET_SAMPLE_RATE // g, rate // g
        cutoff = RESAMPLER_ROLLOFF * min(1.0, self._up / self._down)
        # Same support as audio_io's kernel, plus one sample of margin for the phase offset.
        self._half_width = math.ceil(RESAMPLER_ZERO_CROSSINGS / cutoff) + 1
        self._history = np.zeros(0, dtype=np.float32)
        self._history_start = 0  # absolute input index of _history[0]; always a multiple of _down
        self._received = 0  # input samples so far
        self._emitted = 0  # output samples so far

    def _emit_until(self, n_end: int) -> np.ndarray:
        """Output samples [emitted, n_end), computed from the history with aligned left context."""
        if n_end <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        # Start the window on a multiple of _down (an exact output instant) at least half_width input samples
        # before the first output's time, so that output has its full left context.
        first_time = self._emitted * self._down / self._up
        start = max(0, math.floor((first_time - self._half_width) / self._down) * self._down)
        window = self._history[start - self._history_start :]
        out = resample(window, self.rate, TARGET_SAMPLE_RATE)
        offset = start // self._down * self._up
        piece = out[self._emitted - offset : n_end - offset]
        self._emitted = n_end
        # Keep only what later outputs can need.
        next_time = self._emitted * self._down / self._up
        keep_from = max(
            self._history_start, math.floor((next_time - self._half_width) / self._down) * self._down
        )
        self._history = self._history[keep_from - self._history_start :]
        self._history_start = keep_from
        return piece

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add ``[N]`` float32 input samples; returns the 16 kHz samples now complete (possibly none)."""
        if self.rate == TARGET_SAMPLE_RATE:
            self._received += samples.size
            self._emitted += samples.size
            return np.asarray(samples, dtype=np.float32).copy()
        self._history = np.concatenate([self._history, np.asarray(samples, dtype=np.float32)])
        self._received += samples.size
        # Outputs whose time + half_width is inside the received input are final.
        n_ready = math.floor((self._received - self._half_width) * self._up / self._down) + 1
        return self._emit_until(max(n_ready, 0))

    def flush(self) -> np.ndarray:
        """End of stream: the remaining 16 kHz samples (the input is taken as silent after its end)."""
        if self.rate == TARGET_SAMPLE_RATE:
            return np.zeros(0, dtype=np.float32)
        return self._emit_until(math.ceil(self._received * self._up / self._down))

"""Audio decoding and resampling for the master's audio front-end.

Every audio input (a file for `talkingmachines run`, an upload for `serve`) becomes one array:
16 kHz mono float32 in [-1, 1], the rate the wav2vec2 front-end and the publishers expect.

Resampling is a band-limited polyphase filter (Kaiser-windowed sinc) evaluated with one strided
`conv1d`: the rate ratio is reduced to `up/down` by their gcd, so only `up` distinct filter phases
exist and output sample `up*b + p` is the dot product of phase `p`'s taps with the input around
sample `down*b`. torchaudio is not a dependency, hence this small implementation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

TARGET_SAMPLE_RATE = 16_000
"""Hz: the rate of every array this module returns."""

SUPPORTED_FORMATS = ("WAV", "FLAC", "OGG")

# Kaiser-sinc parameters of the "best" quality presets used by resampy/torchaudio: pass band up to
# ~94.8% of the lower Nyquist frequency, stop-band attenuation well below -80 dB.
RESAMPLER_ROLLOFF = 0.9475937167399596
RESAMPLER_ZERO_CROSSINGS = 64
_KAISER_BETA = 14.769656459379492


class AudioDecodeError(ValueError):
    """The audio input could not be decoded into samples (unreadable, unsupported, empty, too long)."""


def _describe(source: str | Path | bytes | BinaryIO) -> str:
    if isinstance(source, str | Path):
        return f"audio file {str(source)!r}"
    if isinstance(source, bytes | bytearray):
        return f"audio data ({len(source)} bytes)"
    return "audio stream"


def load_audio(
    source: str | Path | bytes | BinaryIO,
    *,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode WAV/FLAC/OGG (any rate, any channel count) into 16 kHz mono float32.

    Args:
        source: a path, the encoded bytes, or a binary file object.
        max_seconds: reject inputs longer than this (checked from the header, before decoding).

    Returns:
        `[N]` float32 samples at 16 kHz; channels are averaged to mono.

    Raises:
        AudioDecodeError: unreadable or unsupported data, no samples, or longer than `max_seconds`.
    """
    what = _describe(source)
    stream: str | BinaryIO
    if isinstance(source, bytes | bytearray):
        stream = io.BytesIO(bytes(source))
    elif isinstance(source, Path):
        stream = str(source)
    else:
        stream = source
    if isinstance(stream, str) and not Path(stream).is_file():
        raise AudioDecodeError(f"{what} does not exist or is not a file")
    try:
        with sf.SoundFile(stream) as f:
            rate = int(f.samplerate)
            if max_seconds is not None and f.frames > max_seconds * rate:
                raise AudioDecodeError(
                    f"{what} lasts {f.frames / rate:.1f} s, longer than the limit of {max_seconds:.1f} s "
                    "— send a shorter clip or raise the limit"
                )
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioDecodeError(
            f"{what} could not be decoded ({exc}); supported formats are {', '.join(SUPPORTED_FORMATS)} "
            "(any sample rate, mono or stereo)"
        ) from exc
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{what} holds no samples")
    mono = to_mono(data)
    if not np.all(np.isfinite(mono)):
        raise AudioDecodeError(f"{what} holds NaN or infinite samples")
    return resample(mono, rate, TARGET_SAMPLE_RATE)


def pushed_pcm(pcm: np.ndarray) -> np.ndarray:
    """What a streaming front-end's `push()` accepts: mono `[N]` float samples in [-1, 1] → float32."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"push() takes mono [N] 16 kHz samples, got shape {list(pcm.shape)}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise TypeError(
            f"push() takes float samples in [-1, 1], got dtype {pcm.dtype} — convert PCM16 /32768"
        )
    return pcm.astype(np.float32, copy=False)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """`[N]` or `[N, C]` samples → `[N]` float32, the mean over channels."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise ValueError(f"audio samples must be [N] or [N, channels], got shape {list(samples.shape)}")
    return samples.mean(axis=1, dtype=np.float32)


def _polyphase_kernel(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Kaiser-windowed sinc taps, one row per output phase.

    Returns:
        `[up, 1, K]` float64 taps and the left padding `W` (in input samples): output sample
        `up*b + p` = sum_j x[down*b + j - W] * taps[p, 0, j].
    """
    cutoff = RESAMPLER_ROLLOFF * min(1.0, up / down)  # as a fraction of the input Nyquist frequency
    half_width = math.ceil(RESAMPLER_ZERO_CROSSINGS / cutoff)
    # Distance (in input samples) from phase p's output instant, down*b + p*down/up, to input sample
    # down*b + j - W.
    j = torch.arange(2 * half_width + down, dtype=torch.float64)
    phase_offset = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    distance = phase_offset - (j[None, :] - half_width)
    inside = distance.abs() <= half_width
    ratio = (distance / half_width).clamp(-1.0, 1.0)
    window = torch.special.i0(_KAISER_BETA * torch.sqrt(1.0 - ratio**2)) / torch.special.i0(
        torch.tensor(_KAISER_BETA, dtype=torch.float64)
    )
    taps = cutoff * torch.sinc(cutoff * distance) * window * inside
    return taps[:, None, :], half_width


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of mono audio.

    Args:
        samples: `[N]` float samples at `orig_rate` Hz.
        orig_rate, new_rate: sample rates in Hz (positive integers).

    Returns:
        `[ceil(N * new_rate / orig_rate)]` float32 samples at `new_rate` Hz; sample `n` is the
        band-limited signal at time `n / new_rate` s (no delay). Content above 94.8% of the lower
        Nyquist frequency is removed, so downsampling does not alias.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} → {new_rate} Hz")
    if samples.ndim != 1:
        raise ValueError(f"resample takes mono [N] samples, got shape {list(samples.shape)}")
    x = np.asarray(samples, dtype=np.float32)
    if orig_rate == new_rate or x.size == 0:
        return x.copy()
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    taps, pad = _polyphase_kernel(up, down)
    n_out = math.ceil(x.size * up / down)
    n_blocks = math.ceil(n_out / up)
    # Enough zero padding on the right for the last block's full support.
    right = n_blocks * down + taps.shape[-1] - pad - x.size
    padded = F.pad(torch.from_numpy(x).to(torch.float64)[None, None, :], (pad, max(right, 0)))
    blocks = F.conv1d(padded, taps, stride=down)  # [1, up, n_blocks]
    out = blocks[0, :, :n_blocks].transpose(0, 1).reshape(-1)[:n_out]
    return out.to(torch.float32).numpy()


OUTPUT_SAMPLE_RATES = (TARGET_SAMPLE_RATE, 48_000)


def output_sample_rate(fps: int) -> int:
    """The rate of the audio published with video at ``fps``: the first of 16 kHz and 48 kHz that gives every
    frame a whole number of samples (16 fps: 16 kHz, 1000 a frame; LiveAct's 24 fps: 48 kHz, 2000 a frame),
    so frame ``v`` plays output samples ``[v·spf, (v+1)·spf)`` exactly."""
    for rate in OUTPUT_SAMPLE_RATES:
        if rate % fps == 0:
            return rate
    raise ValueError(f"{fps} fps divides none of the output audio rates {OUTPUT_SAMPLE_RATES} Hz")


def resample_span(
    read: Callable[[int, int], np.ndarray], start: int, stop: int, orig_rate: int, new_rate: int
) -> np.ndarray:
    """Samples ``[start, stop)`` at ``new_rate`` (a multiple of ``orig_rate``) of the signal whose
    ``orig_rate`` samples ``read(lo, hi)`` returns (zeros outside it): exactly what ``resample`` of the whole
    signal gives there, from only the input around the span (the filter's support plus a margin)."""
    if new_rate % orig_rate:
        raise ValueError(f"resample_span upsamples by a whole factor; got {orig_rate} → {new_rate} Hz")
    up = new_rate // orig_rate
    if up == 1:
        return np.asarray(read(start, stop), dtype=np.float32)
    _, half_width = _polyphase_kernel(up, 1)
    lo = start // up - half_width - 2
    hi = -(-stop // up) + half_width + 2
    out = resample(np.asarray(read(lo, hi), dtype=np.float32), orig_rate, new_rate)
    return out[start - up * lo : stop - up * lo]

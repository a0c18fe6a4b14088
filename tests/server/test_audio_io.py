"""frontends.audio_io: decoding any rate/format/channel count to 16 kHz mono, and the resampler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from frontends.audio_io import AudioDecodeError, load_audio, resample


def _sine(freq_hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext"),
    [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")],
)
def test_each_format_decodes_to_16k_mono_float32(tmp_path: Path, fmt: str, subtype: str, ext: str) -> None:
    path = tmp_path / f"tone.{ext}"
    sf.write(path, _sine(440, 16_000, 1.0), 16_000, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert audio.shape == (16_000,)
    reference = _sine(440, 16_000, 1.0)
    tolerance = 0.05 if fmt == "OGG" else 1e-3  # Vorbis is lossy
    assert np.abs(audio[2000:-2000] - reference[2000:-2000]).max() < tolerance


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_other_rates_are_resampled_to_16k(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "tone.wav"
    sf.write(path, _sine(440, rate, 1.0), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.shape == (16_000,)
    assert np.abs(audio[500:-500] - _sine(440, 16_000, 1.0)[500:-500]).max() < 1e-4


def test_stereo_is_averaged_to_mono() -> None:
    left, right = _sine(440, 16_000, 0.5), _sine(1000, 16_000, 0.5, amplitude=0.25)
    buf = io.BytesIO()
    sf.write(buf, np.stack([left, right], axis=1), 16_000, format="WAV", subtype="FLOAT")
    audio = load_audio(buf.getvalue())
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-7)


def test_resampler_reproduces_a_sine_at_the_new_rate() -> None:
    out = resample(_sine(1000, 44_100, 2.0), 44_100, 16_000)
    assert out.shape == (32_000,)
    # Away from the zero-padded edges the band-limited result is the analytic sine at 16 kHz.
    np.testing.assert_allclose(out[1000:-1000], _sine(1000, 16_000, 2.0)[1000:-1000], atol=1e-5)


def test_resampler_keeps_a_tone_near_the_new_nyquist() -> None:
    out = resample(_sine(7_000, 48_000, 1.0), 48_000, 16_000)
    np.testing.assert_allclose(out[1000:-1000], _sine(7_000, 16_000, 1.0)[1000:-1000], atol=1e-4)


def test_resampler_removes_content_above_the_new_nyquist() -> None:
    # 12 kHz would alias to 4 kHz at 16 kHz; the anti-aliasing filter must remove it (< -80 dB).
    out = resample(_sine(12_000, 44_100, 1.0), 44_100, 16_000)
    assert np.abs(out[1000:-1000]).max() < 0.5 * 1e-4


def test_upsampling_preserves_a_sine() -> None:
    out = resample(_sine(300, 8_000, 1.0), 8_000, 16_000)
    np.testing.assert_allclose(out[500:-500], _sine(300, 16_000, 1.0)[500:-500], atol=1e-5)


def test_corrupt_file_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio at all")
    with pytest.raises(AudioDecodeError, match=r"broken\.wav.*could not be decoded.*WAV, FLAC, OGG"):
        load_audio(path)


def test_missing_file_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_audio_longer_than_the_limit_is_rejected_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16_000 * 3, dtype=np.float32), 16_000)
    with pytest.raises(AudioDecodeError, match=r"lasts 3\.0 s, longer than the limit of 2\.0 s"):
        load_audio(path, max_seconds=2.0)

"""frontends.infinitetalk_audio: upstream-equal whole-clip features, the SoX tempo, and the live stream.

The fixtures under tests/fixtures/liveact_audio/ were written by SoulX-LiveAct's and InfiniteTalk's own code
(tests/oracles/make_liveact_audio_fixtures.py) with the tiny random wav2vec2 saved beside them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from frontends.audio_io import resample
from frontends.infinitetalk_audio import (
    FRAME_SAMPLES,
    InfiniteTalkAudio,
    InfiniteTalkAudioConfig,
    Tempo,
    TempoParams,
    frame_windows,
    measure_streaming_error,
    num_feature_frames,
    split_first_frame,
    time_stretch,
    upstream_iteration_frames,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "liveact_audio"
CHECKPOINT = FIXTURES / "wav2vec2"
UPSTREAM_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def upstream() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "upstream.safetensors"))


@pytest.fixture(scope="module")
def tiny() -> InfiniteTalkAudio:
    return InfiniteTalkAudio(InfiniteTalkAudioConfig())


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced harmonic tone in syllable bursts plus light noise: [N] float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(16_000 * seconds)) / 16_000
    syllables = np.clip(np.sin(2 * np.pi * 2.7 * t + 0.8 * np.sin(2 * np.pi * 0.4 * t)), 0, None)
    phase = 2 * np.pi * np.cumsum(140 + 50 * np.sin(2 * np.pi * 0.5 * t)) / 16_000
    voiced = 0.3 * np.sin(phase) + 0.15 * np.sin(2 * phase) + 0.08 * np.sin(3 * phase)
    return (syllables * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _checkpoint(fps: float, **overrides) -> InfiniteTalkAudio:
    return InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(CHECKPOINT), fps=fps, **overrides))


# --- equality with upstream -------------------------------------------------------------------------------
def test_fixtures_name_the_upstream_commit_and_stay_small() -> None:
    meta = json.loads((FIXTURES / "upstream.json").read_text())
    assert len(meta["liveact_commit"]) == 40 and len(meta["infinitetalk_commit"]) == 40
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size < 2 * 1024 * 1024


@pytest.mark.parametrize("fps", [24, 20, 25])
def test_stretch_and_gain_equal_upstreams_resample_audio(upstream: dict, fps: int) -> None:
    """SoX `tempo 25/fps` then x3: the oracle's `sox` writes a 2^-24 grid, hence 3 * 6e-8."""
    audio = _checkpoint(fps)
    prepared = audio.prepare(upstream["clip"].numpy())
    expected = upstream[f"liveact_fps{fps}_audio"].numpy()
    assert prepared.shape == expected.shape
    np.testing.assert_allclose(prepared, expected, rtol=0, atol=2.5e-7)


@pytest.mark.equality
@pytest.mark.parametrize("fps", [24, 20, 25])
def test_wav2vec2_features_of_the_same_audio_equal_upstream(upstream: dict, fps: int) -> None:
    """Normalisation, CNN, interpolation to the frame count, encoder, hidden_states[1:]; exact on 1 thread."""
    audio = _checkpoint(fps)
    wave = upstream[f"liveact_fps{fps}_audio"].numpy()
    features = audio.embed(wave, num_feature_frames(wave.size))
    torch.testing.assert_close(
        features, upstream[f"liveact_fps{fps}_embedding"], rtol=0, atol=UPSTREAM_TOLERANCE
    )


@pytest.mark.equality
@pytest.mark.parametrize("fps", [24, 20, 25])
def test_clip_features_equal_upstream(upstream: dict, fps: int) -> None:
    audio = _checkpoint(fps)
    features = audio.clip_embedding(upstream["clip"].numpy())
    expected = upstream[f"liveact_fps{fps}_embedding"]
    assert features.shape == expected.shape  # [frames at fps, 2 layers, 32]
    torch.testing.assert_close(features, expected, rtol=0, atol=UPSTREAM_TOLERANCE)


@pytest.mark.equality
@pytest.mark.parametrize(("fps", "iteration"), [(24, 0), (24, 2), (20, 0)])
def test_frame_windows_equal_get_audio_emb(upstream: dict, fps: int, iteration: int) -> None:
    """Iteration 2 (frames 32..84) runs past the clip's 61 frames: indices clamp to the last frame."""
    features = _checkpoint(fps).clip_embedding(upstream["clip"].numpy())
    frames = upstream_iteration_frames(iteration)
    windows = frame_windows(features, frames.start, frames.stop)
    expected = upstream[f"liveact_fps{fps}_iter{iteration}_windows"]
    assert windows.shape == expected.shape == (53, 5, 2, 32)
    torch.testing.assert_close(windows, expected, rtol=0, atol=UPSTREAM_TOLERANCE)


@pytest.mark.equality
def test_infinitetalk_loudness_normalisation_is_a_gain_the_normaliser_removes(upstream: dict) -> None:
    """InfiniteTalk: pyloudnorm to -23 LUFS, no stretch. Without pyloudnorm (gain 1) only the 1e-7 variance
    epsilon of the input normalisation differs."""
    features = _checkpoint(25, gain=1.0).clip_embedding(upstream["clip"].numpy())
    torch.testing.assert_close(features, upstream["infinitetalk_embedding"], rtol=0, atol=1e-4)


# --- SoX tempo ------------------------------------------------------------------------------------------
def test_tempo_geometry_is_soxs_default_profile() -> None:
    # sox -V3 ... tempo 1.0417: segment=82 search=14.6769 overlap=12.0006 (ms)
    params = TempoParams.for_rate(16_000, 25 / 24)
    assert (params.segment, params.search, params.overlap) == (1312, 235, 192)


@pytest.mark.parametrize("factor", [25 / 24, 1.25, 25 / 30])
def test_tempo_is_the_same_pushed_in_pieces_and_has_soxs_length(factor: float) -> None:
    x = _speech_like(2.3)
    whole = time_stretch(x, 16_000, factor)
    assert whole.size == int(x.size / factor + 0.5)
    tempo = Tempo(16_000, factor)
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.integers(0, x.size, size=12))
    pieces = [tempo.push(part) for part in np.split(x, cuts)]
    pieces.append(tempo.finish())
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_tempo_input_needed_is_exact() -> None:
    tempo = Tempo(16_000, 25 / 24)
    target = 20 * FRAME_SAMPLES
    need = tempo.input_needed(target)
    x = _speech_like(2.0)
    got = tempo.push(x[: need - 1]).size
    assert got < target
    assert got + tempo.push(x[need - 1 : need]).size >= target


def test_tempo_of_one_is_the_identity() -> None:
    x = _speech_like(0.5)
    np.testing.assert_array_equal(time_stretch(x, 16_000, 1.0), x)


# --- loading and input handling --------------------------------------------------------------------------
def test_missing_checkpoint_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(tmp_path / "absent")))


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(tmp_path)))


def test_preprocessor_config_is_required_unless_normalize_is_given(tmp_path: Path) -> None:
    folder = tmp_path / "w2v"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(folder)))
    audio = InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(folder), normalize=True))
    assert audio.feature_extractor.do_normalize


def test_checkpoint_at_another_sample_rate_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "w2v"
    shutil.copytree(CHECKPOINT, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "sampling_rate": 8000}))
    with pytest.raises(ValueError, match="sampling_rate=8000"):
        InfiniteTalkAudio(InfiniteTalkAudioConfig(checkpoint=str(folder)))


def test_other_sample_rates_are_resampled_first(tiny: InfiniteTalkAudio) -> None:
    x48 = resample(_speech_like(1.5), 16_000, 48_000)
    torch.testing.assert_close(
        tiny.clip_embedding(x48, 48_000), tiny.clip_embedding(resample(x48, 48_000, 16_000)), rtol=0, atol=0
    )


def test_layers_pick_hidden_states(tiny: InfiniteTalkAudio) -> None:
    x = _speech_like(1.0)
    both = tiny.clip_embedding(x)
    second = InfiniteTalkAudio(InfiniteTalkAudioConfig(layers=(1,)), tiny.model, tiny.feature_extractor)
    torch.testing.assert_close(second.clip_embedding(x), both[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer 2"):
        InfiniteTalkAudio(InfiniteTalkAudioConfig(layers=(2,)), tiny.model, tiny.feature_extractor)


def test_config_rejects_an_even_window_and_impossible_fps() -> None:
    with pytest.raises(ValueError, match="odd"):
        InfiniteTalkAudioConfig(window=4)
    with pytest.raises(ValueError, match="positive"):
        InfiniteTalkAudioConfig(fps=0)


# --- per-frame windows and the DiT's regrouping -----------------------------------------------------------
def test_upstream_iterations_cover_53_frames_32_apart() -> None:
    assert upstream_iteration_frames(0) == upstream_iteration_frames(1) == range(0, 53)
    assert upstream_iteration_frames(2) == range(32, 85)
    assert upstream_iteration_frames(3) == range(64, 117)


def test_split_first_frame_keeps_the_centre_of_middle_frames() -> None:
    windows = torch.randn(53, 5, 2, 3)
    first, latter = split_first_frame(windows)
    assert first.shape == (1, 5, 2, 3) and latter.shape == (13, 8, 2, 3)
    k = 4
    torch.testing.assert_close(latter[k, :3], windows[1 + 4 * k, :3])
    torch.testing.assert_close(latter[k, 3], windows[2 + 4 * k, 2])
    torch.testing.assert_close(latter[k, 4], windows[3 + 4 * k, 2])
    torch.testing.assert_close(latter[k, 5:], windows[4 + 4 * k, 2:])


# --- streaming -----------------------------------------------------------------------------------------
def test_stream_windows_have_the_documented_layout_and_readiness(tiny: InfiniteTalkAudio) -> None:
    stream = tiny.stream()
    need = stream.required_samples(53)
    x = _speech_like(4.0)
    stream.push(x[: need - 1])
    assert not stream.ready(53)
    with pytest.raises(RuntimeError, match="not ready"):
        stream.windows(0, 53)
    stream.push(x[need - 1 : need])
    assert stream.ready(53) and stream.ready_frames() >= 53
    windows = stream.windows(0, 53)
    assert windows.shape == (53, 5, 2, 32) and windows.dtype == torch.float32
    # Frame 0's window clamps at the clip start like upstream: slots 0..2 are all frame 0.
    torch.testing.assert_close(windows[0, 0], windows[0, 2], rtol=0, atol=0)
    torch.testing.assert_close(windows[1, :-1], windows[0, 1:], rtol=0, atol=0)


def test_stream_does_not_depend_on_how_audio_was_pushed(tiny: InfiniteTalkAudio) -> None:
    x = _speech_like(5.0)
    results = []
    for push in (160, 3200, 17_000):
        stream = tiny.stream()
        for i in range(0, x.size, push):
            stream.push(x[i : i + push])
        results.append([stream.windows(r.start, r.stop) for r in (range(0, 53), range(32, 85))])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.equality
def test_stream_with_context_covering_the_clip_equals_the_clip(tiny: InfiniteTalkAudio) -> None:
    """Then every buffer is the whole clip: what is left is the grid (exact 2j here) and the clamping."""
    config = InfiniteTalkAudioConfig(left_context_frames=1000, right_context_frames=1000)
    audio = InfiniteTalkAudio(config, tiny.model, tiny.feature_extractor)
    x = _speech_like(3.0)
    keep = x.size
    while Tempo(16_000, config.tempo_factor).output_length(keep) % FRAME_SAMPLES:
        keep -= 1
    offline = audio.clip_embedding(x[:keep])
    stream = audio.stream()
    stream.push(x[:keep])
    assert not stream.ready(1)
    stream.end_of_stream()
    assert stream.num_frames == offline.shape[0] == 72
    for frames in (range(0, 53), range(32, 85)):  # the second runs past the end: clamped as upstream
        torch.testing.assert_close(
            stream.windows(frames.start, frames.stop),
            frame_windows(offline, frames.start, frames.stop),
            rtol=0,
            atol=UPSTREAM_TOLERANCE,
        )


def test_streaming_error_shrinks_with_context(tiny: InfiniteTalkAudio) -> None:
    """The documented trade-off (module docstring): 4 s left context and no right context (upstream's
    own streaming latency) vs 2.56 s of right context too, which covers the 25 Hz positional conv."""
    x = _speech_like(8.0)
    errors = {}
    for left, right in ((0, 0), (100, 0), (100, 64)):
        config = InfiniteTalkAudioConfig(left_context_frames=left, right_context_frames=right)
        audio = InfiniteTalkAudio(config, tiny.model, tiny.feature_extractor)
        errors[left, right] = measure_streaming_error(audio, x)["rms_rel"]
    assert errors[0, 0] > errors[100, 0] > errors[100, 64]
    assert errors[100, 0] < 0.25
    assert errors[100, 64] < 0.02


def test_stream_refuses_to_go_back_and_to_push_after_the_end(tiny: InfiniteTalkAudio) -> None:
    stream = tiny.stream()
    stream.push(_speech_like(4.0))
    stream.windows(32, 53)
    with pytest.raises(RuntimeError, match="must not go back"):
        stream.windows(0, 53)
    stream.end_of_stream()
    with pytest.raises(RuntimeError, match="after end_of_stream"):
        stream.push(np.zeros(10, dtype=np.float32))
    last = stream.windows(200, 210)  # past the end: every slot is the last frame
    torch.testing.assert_close(last[0, 0], last[-1, -1], rtol=0, atol=0)

"""frontends.audio_features: the streaming wav2vec2 front-end (tiny random Wav2Vec2Model, real forwards)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frontends.audio_features import (
    AudioFeaturizer,
    AudioFeaturizerConfig,
    check_matches,
    featurizer_config_for,
)

SPF = 1000  # samples per video frame at 16 kHz, 16 fps


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A 220 Hz tone with 3 Hz syllable-like envelope plus noise: [N] float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(16_000 * seconds)) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(
        t.size
    )
    return wave.astype(np.float32)


def _all_chunks(featurizer: AudioFeaturizer) -> list:
    return [featurizer.features_for_chunk(c) for c in featurizer.ready_chunks()]


def test_chunk_features_have_the_documented_layout() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    featurizer.push(_speech_like(1.5))
    chunk = featurizer.features_for_chunk(0)
    # [F=3 latent frames, W=5 window, P=4 video-rate vectors, L=2 layers, D=32 hidden]
    assert chunk.features.shape == (3, 5, 4, 2, 32)
    assert chunk.span.shape == (7, 4, 2, 32)
    assert chunk.features.dtype == torch.float32
    assert chunk.speaking.shape == (3, 4) and chunk.speaking.dtype == torch.bool
    assert chunk.pcm.shape == (9 * SPF,)


def test_windows_of_neighbouring_latent_frames_overlap_by_shifting() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    featurizer.push(_speech_like(2.0))
    features = featurizer.features_for_chunk(0).features
    # Latent frame f's window slot w is latent frame f-2+w, so frame f+1's slot w is frame f's slot w+1.
    torch.testing.assert_close(features[1, :-1], features[0, 1:], rtol=0, atol=0)
    torch.testing.assert_close(features[2, :-1], features[1, 1:], rtol=0, atol=0)


def test_chunk_becomes_ready_exactly_at_its_lookahead() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    # Chunk 0 = latent frames 0..2 = video frames -3..8; its look-ahead is latent frames 3..4 = frames 9..16.
    featurizer.push(_speech_like(17 * SPF / 16_000)[:-1])
    assert list(featurizer.ready_chunks()) == []
    featurizer.push(np.zeros(1, dtype=np.float32))
    assert list(featurizer.ready_chunks()) == [0]
    # Each later chunk needs 12 more video frames (3 latent frames) of audio.
    featurizer.push(_speech_like(12 * SPF / 16_000)[:-1])
    assert list(featurizer.ready_chunks()) == [0]
    featurizer.push(np.zeros(1, dtype=np.float32))
    assert list(featurizer.ready_chunks()) == [0, 1]


def test_asking_for_a_chunk_before_its_audio_arrives_is_an_error() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    featurizer.push(np.zeros(16_000, dtype=np.float32))
    with pytest.raises(
        RuntimeError, match="chunk 0 is not ready: it needs 17000 samples, 16000 have arrived"
    ):
        featurizer.features_for_chunk(0)


def test_features_do_not_depend_on_how_audio_was_pushed() -> None:
    audio = _speech_like(3.0)
    whole = AudioFeaturizer(AudioFeaturizerConfig(left_context_s=1.0))
    whole.push(audio)
    whole.end_of_stream()
    pieces = AudioFeaturizer(AudioFeaturizerConfig(left_context_s=1.0))
    taken = []
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.integers(0, audio.size, size=20))
    for part in np.split(audio, cuts):
        pieces.push(part)
        taken += _all_chunks(pieces)  # take chunks as soon as they are ready, as `serve` does
    pieces.end_of_stream()
    taken += _all_chunks(pieces)
    expected = _all_chunks(whole)
    assert [c.chunk_index for c in taken] == [c.chunk_index for c in expected]
    for got, want in zip(taken, expected, strict=True):
        torch.testing.assert_close(got.features, want.features, rtol=0, atol=0)
        assert torch.equal(got.speaking, want.speaking)
        np.testing.assert_array_equal(got.pcm, want.pcm)


def test_silence_from_equals_having_pushed_silence_after_the_cut() -> None:
    audio = _speech_like(3.0)
    cut = 20_000
    barged = AudioFeaturizer(AudioFeaturizerConfig(left_context_s=1.0))
    barged.push(audio)
    barged.silence_from(cut)
    barged.end_of_stream()
    reference = AudioFeaturizer(AudioFeaturizerConfig(left_context_s=1.0))
    reference.push(audio[:cut])
    reference.push_silence(audio.size - cut)
    reference.end_of_stream()
    got, want = _all_chunks(barged), _all_chunks(reference)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.features, w.features, rtol=0, atol=0)
        assert torch.equal(g.speaking, w.speaking)


def test_audio_past_the_lookahead_does_not_change_a_chunk() -> None:
    audio = _speech_like(2.0)
    early = AudioFeaturizer(AudioFeaturizerConfig())
    early.push(audio[: 17 * SPF])
    late = AudioFeaturizer(AudioFeaturizerConfig())
    late.push(audio)
    torch.testing.assert_close(
        early.features_for_chunk(0).features, late.features_for_chunk(0).features, rtol=0, atol=0
    )


def test_chunk_features_equal_a_direct_wav2vec2_pass_over_the_rolling_buffer() -> None:
    """Independent check of the time grid: wav2vec2 on stream samples [start, end), interpolated to
    video-frame centres, where end = the chunk's look-ahead limit and start = left context before the
    window, rounded down to the 320-sample hop grid."""
    config = AudioFeaturizerConfig(left_context_s=0.5)
    featurizer = AudioFeaturizer(config)
    audio = _speech_like(3.0)
    featurizer.push(audio)
    chunks = _all_chunks(featurizer)
    chunk = chunks[2]
    first_video_frame = 12 * 2 - 11  # window of chunk 2 = latent frames 4..10 = video frames 13..40
    end = (first_video_frame + 28) * SPF
    start = (first_video_frame * SPF - 8000) // 320 * 320
    with torch.inference_mode():
        hidden = featurizer.model(
            torch.from_numpy(audio[start:end])[None], output_hidden_states=True
        ).hidden_states
    layers = torch.stack([h[0] for h in hidden[1:]], dim=1).numpy()  # [T, L, D] at 50 Hz
    frame_centres = 320 * np.arange(layers.shape[0]) + 200 + start
    video_centres = (first_video_frame + np.arange(28)) * SPF + SPF / 2
    flat = layers.reshape(layers.shape[0], -1)
    expected = np.stack(
        [np.interp(video_centres, frame_centres, flat[:, i]) for i in range(flat.shape[1])], 1
    )
    expected = expected.reshape(7, 4, *layers.shape[1:])  # 7 latent frames of the window span
    for f in range(3):
        np.testing.assert_allclose(chunk.features[f].numpy(), expected[f : f + 5], atol=1e-5)


def test_streaming_features_stay_close_to_a_whole_clip_computation() -> None:
    """Not equal by construction (global self-attention and GroupNorm statistics; with random weights the
    attention is nearly uniform, so every frame depends on the whole buffer): the relative error is about
    0.1-0.2 here. A misaligned time grid gives 0.6-0.9, which this catches."""
    audio = _speech_like(6.0)
    featurizer = AudioFeaturizer(AudioFeaturizerConfig(left_context_s=2.0))
    featurizer.push(audio)
    featurizer.end_of_stream()
    chunks = _all_chunks(featurizer)
    with torch.inference_mode():
        hidden = featurizer.model(torch.from_numpy(audio)[None], output_hidden_states=True).hidden_states
    layers = torch.stack([h[0] for h in hidden[1:]], dim=1).numpy()
    frame_centres = 320 * np.arange(layers.shape[0]) + 200
    flat = layers.reshape(layers.shape[0], -1)
    for chunk in chunks[3:6]:
        video_centres = np.array(list(featurizer.output_frames(chunk.chunk_index))) * SPF + SPF / 2
        whole = np.stack(
            [np.interp(video_centres, frame_centres, flat[:, i]) for i in range(flat.shape[1])], 1
        )
        own = chunk.features[:, 2].reshape(12, -1).numpy()  # the chunk's own latent frames, window centre
        assert np.linalg.norm(own - whole) / np.linalg.norm(whole) < 0.3


def test_silence_is_the_features_of_a_zero_waveform_with_speaking_false() -> None:
    config = AudioFeaturizerConfig(left_context_s=1.0)
    listening = AudioFeaturizer(config)
    listening.push_silence(30 * SPF)
    chunk = listening.features_for_chunk(0)
    assert not chunk.speaking.any()
    assert not chunk.pcm.any()
    zeros = AudioFeaturizer(config)
    zeros.push(np.zeros(30 * SPF, dtype=np.float32))
    torch.testing.assert_close(chunk.features, zeros.features_for_chunk(0).features, rtol=0, atol=0)


def test_speaking_flags_follow_the_audio() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    # Video frames 0..4 speak, 5.. are silent; chunk 0's latent frames cover frames (-3..0), (1..4), (5..8).
    featurizer.push(_speech_like(5 * SPF / 16_000))
    featurizer.push_silence(20 * SPF)
    speaking = featurizer.features_for_chunk(0).speaking
    assert speaking.tolist() == [[False, False, False, True], [True] * 4, [False] * 4]


def test_end_of_stream_pads_with_silence_and_covers_all_audio() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    audio = _speech_like(2.0)  # 32 video frames: chunk 0 gives 9 frames, chunks 1 and 2 give 12 each
    featurizer.push(audio)
    assert list(featurizer.ready_chunks()) == [0, 1]
    featurizer.end_of_stream()
    assert featurizer.num_chunks == 3
    chunks = _all_chunks(featurizer)
    assert [c.chunk_index for c in chunks] == [0, 1, 2]
    played = np.concatenate([c.pcm for c in chunks])
    assert played.size == 33 * SPF
    np.testing.assert_array_equal(played[: audio.size], audio)
    assert not played[audio.size :].any()
    assert chunks[2].speaking[-1].tolist() == [True, True, True, False]


def test_a_taken_chunk_cannot_be_taken_again() -> None:
    featurizer = AudioFeaturizer(AudioFeaturizerConfig())
    featurizer.push(_speech_like(2.0))
    featurizer.features_for_chunk(0)
    with pytest.raises(RuntimeError, match="chunk 0 was already taken"):
        featurizer.features_for_chunk(0)


def test_selected_layers_are_kept_in_order() -> None:
    audio = _speech_like(1.5)
    both = AudioFeaturizer(AudioFeaturizerConfig())
    both.push(audio)
    last = AudioFeaturizer(AudioFeaturizerConfig(layers=(1,)))
    last.push(audio)
    torch.testing.assert_close(
        last.features_for_chunk(0).features[..., 0, :],
        both.features_for_chunk(0).features[..., 1, :],
        rtol=0,
        atol=0,
    )


def test_default_front_end_fits_the_tiny_preset_audio_projection() -> None:
    from proto.model_config import get_model_preset
    from workers.audio import AudioProjection

    audio_config = get_model_preset("tiny").audio
    featurizer = AudioFeaturizer(featurizer_config_for(audio_config))
    check_matches(featurizer, audio_config)
    featurizer.push(_speech_like(1.5))
    chunk = featurizer.features_for_chunk(0)
    tokens = AudioProjection(audio_config)(chunk.span[None, None], chunk.speaking_latent[None, None])
    assert tokens.shape == (1, 1, 3, audio_config.num_tokens, audio_config.token_dim)


def test_unknown_layer_index_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"names layer 5, the model has 2"):
        AudioFeaturizer(AudioFeaturizerConfig(layers=(5,)))

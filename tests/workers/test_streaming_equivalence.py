"""Correctness anchor: sparse-causal streaming with the KV cache equals a full-sequence forward with the
sparse block mask (same noise, shared timestep), for the first 7 chunks (the whole 21-frame training clip)."""

import pytest
import torch

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning, face_token_mask, pad_audio_window
from workers.model import WanModel
from workers.streaming import (
    StreamingDiT,
    clean_context_mask,
    full_sequence_denoise,
    sparse_causal_mask,
    teacher_forced_denoise,
)

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

CFG = get_model_preset("tiny")
A = CFG.audio
CHUNKS, F, LAT = 7, 3, 8
TOKENS = F * 16  # tokens per chunk at 64 × 64 px


@pytest.fixture(scope="module")
def clip() -> dict:
    """Noise, I2V conditioning and two characters' audio for a 7-chunk clip."""
    gen = torch.Generator().manual_seed(1)
    frames = CHUNKS * F
    feats = torch.randn(1, 2, frames, A.frames_per_latent, A.wav2vec_layers, A.wav2vec_dim, generator=gen)
    speaking = torch.rand(1, 2, frames, generator=gen) > 0.3
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.75], [0.5, 0.25, 1.0, 1.0]])
    return {
        "noise": torch.randn(2, 16, frames, LAT, LAT, generator=gen),
        "y": torch.randn(20, frames, LAT, LAT, generator=gen),
        "context": torch.randn(9, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=gen),
        "features": pad_audio_window(feats, A.half_window),
        "speaking": speaking,
        "face_mask": face_token_mask(boxes, 4, 4, frames)[None].float(),
    }


def _stream(model: WanModel, cfg: StreamConfig, clip: dict) -> tuple[torch.Tensor, list]:
    engine = StreamingDiT(model, cfg)
    state = engine.open_session(clip["context"], clip["clip_fea"])
    outs = []
    for i in range(CHUNKS):
        frames = slice(i * F, (i + 1) * F)
        audio = AudioConditioning(
            features=clip["features"][:, :, i * F : i * F + F + A.window - 1],
            speaking=clip["speaking"][:, :, frames],
            face_mask=clip["face_mask"][:, :, i * TOKENS : (i + 1) * TOKENS],
        )
        outs.append(
            engine.denoise_chunk(
                state, i, y=clip["y"][:, frames], audio=audio, noise=clip["noise"][:, :, frames]
            )
        )
    return torch.cat(outs, dim=1), state.cross_kv


def _clip_audio(clip: dict) -> AudioConditioning:
    return AudioConditioning(
        features=clip["features"], speaking=clip["speaking"], face_mask=clip["face_mask"]
    )


def test_sparse_mask_lets_chunk_t_see_chunk_0_the_previous_chunk_and_itself():
    mask = sparse_causal_mask(5, 1)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [1, 0, 0, 1, 1],
    ]


def test_clean_context_mask_lets_noisy_chunks_see_clean_context_and_themselves():
    mask = clean_context_mask(3, 1).int()
    assert mask[3:].tolist() == [  # noisy rows over [clean 0..2 ; noisy 0..2]
        [0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ]
    assert mask[:3, 3:].sum() == 0


@pytest.mark.parametrize("position_mode", ["window", "absolute"])
def test_per_step_streaming_equals_masked_full_sequence(model, clip, position_mode):
    cfg = StreamConfig(height=64, width=64, cache_mode="per-step", position_mode=position_mode)
    streamed, cross_kv = _stream(model, cfg, clip)
    reference = full_sequence_denoise(model, cfg, clip["noise"], cross_kv, clip["y"], _clip_audio(clip))
    assert streamed.shape == (16, CHUNKS * F, LAT, LAT)
    assert (streamed - reference).abs().max() <= 1e-5


def test_clean_context_streaming_equals_teacher_forced_full_sequence(model, clip):
    cfg = StreamConfig(height=64, width=64, cache_mode="clean-context")
    streamed, cross_kv = _stream(model, cfg, clip)
    reference = teacher_forced_denoise(
        model, cfg, clip["noise"], streamed, cross_kv, clip["y"], _clip_audio(clip)
    )
    assert (streamed - reference).abs().max() <= 1e-5


def test_the_sparse_mask_matters_for_later_chunks(model, clip):
    """Guard against a vacuous anchor: a dense causal mask gives different chunks from chunk 3 on."""
    cfg = StreamConfig(height=64, width=64)
    streamed, cross_kv = _stream(model, cfg, clip)
    causal = torch.ones(CHUNKS, CHUNKS, dtype=torch.bool).tril()
    causal = causal.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)
    with torch.no_grad():
        v = model(
            clip["noise"][0][None],
            torch.tensor([1000.0]),
            cross_kv=cross_kv,
            y=clip["y"][None],
            audio=_clip_audio(clip),
            attn_mask=causal,
        )[0]
    # One step at σ = 1: x0 = x_T − v. Chunks 0-2 see the same context under both masks, chunk 3 does not.
    sparse_step = full_sequence_denoise(
        model,
        StreamConfig(height=64, width=64, denoising_steps=(1000,)),
        clip["noise"][:1],
        cross_kv,
        clip["y"],
        _clip_audio(clip),
    )
    dense_step = clip["noise"][0] - v
    assert torch.allclose(sparse_step[:, : 3 * F], dense_step[:, : 3 * F], atol=1e-5)
    assert (sparse_step[:, 3 * F :] - dense_step[:, 3 * F :]).abs().max() > 1e-3
    assert streamed.abs().max() > 0

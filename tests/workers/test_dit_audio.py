"""TalkingMachines audio path: projection window, silence, face masks, zero-init, output locality."""

import dataclasses

import pytest
import torch

from proto.model_config import get_model_preset
from workers.audio import AudioConditioning, face_token_mask, normalise_boxes, pad_audio_window
from workers.model import WanModel

CFG = get_model_preset("tiny")
A = CFG.audio
F, H, W = 3, 8, 8  # one chunk of latents; the token grid is 4 × 4
TOKENS_PER_FRAME = 16


def _features(gen: torch.Generator, characters: int = 1, frames: int = F) -> torch.Tensor:
    return torch.randn(
        1,
        characters,
        frames + A.window - 1,
        A.frames_per_latent,
        A.wav2vec_layers,
        A.wav2vec_dim,
        generator=gen,
    )


def _model(num_layers: int, zero_audio: bool) -> WanModel:
    torch.manual_seed(0)
    m = WanModel(dataclasses.replace(CFG, num_layers=num_layers))
    m.init_weights(zero_head=False, zero_audio=zero_audio)
    return m.eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, 16, F, H, W, generator=gen),
        "y": torch.randn(1, 20, F, H, W, generator=gen),
        "context": torch.randn(1, 10, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(1, CFG.clip_tokens, CFG.clip_dim, generator=gen),
    }


def _run(model: WanModel, inputs, audio: AudioConditioning | None) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["x"],
            torch.tensor([700.0]),
            context=inputs["context"],
            clip_fea=inputs["clip_fea"],
            y=inputs["y"],
            audio=audio,
        )


def _latent_region(token_mask: torch.Tensor) -> torch.Tensor:
    """Token mask [F·4·4] → latent-pixel mask [F, 8, 8] (each token covers 2 × 2 latent pixels)."""
    return token_mask.view(F, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)


def test_face_box_selects_the_overlapping_token_cells():
    mask = face_token_mask(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.3, 0.9, 0.45]]), 4, 4, num_frames=2)
    assert mask.shape == (2, 2 * 16)
    first = mask[0, :16].view(4, 4)
    assert first[:2, :2].all() and first.sum() == 4
    # x in [0.6, 0.9) touches columns 2 and 3; y in [0.3, 0.45) touches row 1 only.
    assert mask[1, :16].view(4, 4).nonzero().tolist() == [[1, 2], [1, 3]]
    assert torch.equal(mask[:, :16], mask[:, 16:])


def test_pixel_boxes_are_normalised_by_image_size():
    boxes = normalise_boxes(torch.tensor([[64.0, 32.0, 128.0, 96.0]]), height=128, width=256)
    assert boxes.tolist() == [[0.25, 0.25, 0.5, 0.75]]


def test_invalid_face_box_is_rejected():
    with pytest.raises(ValueError, match="x0 < x1"):
        face_token_mask(torch.tensor([[0.5, 0.0, 0.2, 1.0]]), 4, 4, 1)


def test_each_latent_frame_sees_the_five_latent_frames_centred_on_it():
    proj = _model(1, zero_audio=False).audio_proj
    gen = torch.Generator().manual_seed(2)
    feats = _features(gen, frames=6)  # padded index p holds latent frame p − 2
    speaking = torch.ones(1, 1, 6, dtype=torch.bool)
    with torch.no_grad():
        base = proj(feats, speaking)
        changed = feats.clone()
        changed[:, :, 5] += 1.0  # latent frame 3
        diff = (proj(changed, speaking) - base).abs().amax(dim=(0, 1, 3, 4))
    assert diff[1:6].gt(0).all()  # frames 1..5 have frame 3 inside their window
    assert diff[0] == 0  # frame 0 sees frames −2..2 only


def test_silent_frames_use_the_silence_embedding():
    proj = _model(1, zero_audio=False).audio_proj
    with torch.no_grad():
        proj.silence.normal_()
        speaking = torch.tensor([[[True, False, True]]])
        tokens = proj(_features(torch.Generator().manual_seed(3)), speaking)
    assert tokens.shape == (1, 1, F, A.num_tokens, A.token_dim)
    assert torch.equal(tokens[0, 0, 1], proj.silence)
    assert not torch.equal(tokens[0, 0, 0], proj.silence)


def test_whole_clip_padding_replicates_the_edge_frames():
    feats = torch.randn(1, 2, 5, 1, 1, 3)
    padded = pad_audio_window(feats, 2)
    assert padded.shape == (1, 2, 9, 1, 1, 3)
    assert torch.equal(padded[:, :, 0], feats[:, :, 0]) and torch.equal(padded[:, :, 8], feats[:, :, 4])
    assert torch.equal(padded[:, :, 2:7], feats)


def test_zero_initialised_audio_layers_leave_the_output_unchanged(inputs):
    model = _model(2, zero_audio=True)
    audio = AudioConditioning(
        features=_features(torch.Generator().manual_seed(4)), speaking=torch.ones(1, 1, F, dtype=torch.bool)
    )
    assert torch.equal(_run(model, inputs, audio), _run(model, inputs, None))


def test_changing_audio_changes_only_tokens_inside_the_face_mask(inputs):
    # One block: self-attention runs before the audio branch, so nothing can spread the change afterwards.
    model = _model(1, zero_audio=False)
    gen = torch.Generator().manual_seed(5)
    mask = face_token_mask(torch.tensor([[0.25, 0.0, 0.75, 0.5]]), 4, 4, F)[None]
    speaking = torch.ones(1, 1, F, dtype=torch.bool)
    a = _run(model, inputs, AudioConditioning(features=_features(gen), speaking=speaking, face_mask=mask))
    b = _run(model, inputs, AudioConditioning(features=_features(gen), speaking=speaking, face_mask=mask))
    region = _latent_region(mask[0, 0])[None, None].expand_as(a)
    diff = (a - b).abs()
    assert diff[~region].max() == 0
    assert diff[region].min() > 0


def test_each_character_drives_only_its_own_face(inputs):
    model = _model(1, zero_audio=False)
    gen = torch.Generator().manual_seed(6)
    masks = face_token_mask(torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]), 4, 4, F)[None]
    speaking = torch.ones(1, 2, F, dtype=torch.bool)
    feats = _features(gen, characters=2)
    changed = feats.clone()
    changed[:, 0] = torch.randn(changed[:, 0].shape, generator=gen)  # only character 0's audio changes
    a = _run(model, inputs, AudioConditioning(features=feats, speaking=speaking, face_mask=masks))
    b = _run(model, inputs, AudioConditioning(features=changed, speaking=speaking, face_mask=masks))
    left = _latent_region(masks[0, 0])[None, None].expand_as(a)
    diff = (a - b).abs()
    assert diff[~left].max() == 0
    assert diff[left].min() > 0


def test_a_frames_queries_see_only_that_frames_audio_tokens(inputs):
    model = _model(1, zero_audio=False)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(1, 1, F, A.num_tokens, A.token_dim, generator=gen)
    changed = tokens.clone()
    changed[:, :, 1] += 1.0
    a = _run(model, inputs, AudioConditioning(tokens=tokens))
    b = _run(model, inputs, AudioConditioning(tokens=changed))
    per_frame = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[0] == 0 and per_frame[2] == 0 and per_frame[1] > 0


def test_a_silent_character_ignores_its_audio_features(inputs):
    model = _model(2, zero_audio=False)
    gen = torch.Generator().manual_seed(8)
    silent = torch.zeros(1, 1, F, dtype=torch.bool)
    a = _run(model, inputs, AudioConditioning(features=_features(gen), speaking=silent))
    b = _run(model, inputs, AudioConditioning(features=_features(gen), speaking=silent))
    assert torch.equal(a, b)


def test_audio_conditioning_takes_features_or_tokens_not_both():
    with pytest.raises(ValueError, match="either features and speaking flags, or tokens"):
        AudioConditioning(features=torch.zeros(1), speaking=torch.zeros(1), tokens=torch.zeros(1))

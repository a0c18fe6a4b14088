"""Stage B (training/teacher.py): flow matching in Wan's convention, conditioning dropout, training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decoder.encode import I2VConditioning, image_to_tensor
from proto.model_config import get_model_preset
from training.batches import (
    ChunkAudioWanModel,
    ClipEncoder,
    ModelInputs,
    load_or_build_vae,
    project_chunked_audio,
)
from training.data import DataConfig, SyntheticTalkingDataset
from training.teacher import TeacherConfig, flow_matching_loss, predict_velocity, train_teacher
from workers.audio import AudioConditioning
from workers.checkpoint import load_dit_checkpoint

DATA = DataConfig(height=32, width=32, num_frames=21, two_character_prob=0.5, silent_prob=0.0)


@pytest.fixture(scope="module")
def inputs() -> ModelInputs:
    torch.set_num_threads(1)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny"))
    dataset = SyntheticTalkingDataset(DATA, seed=1)
    return encoder.encode_many([dataset.clip(i) for i in range(4)])


def _model(seed: int = 0) -> ChunkAudioWanModel:
    torch.manual_seed(seed)
    model = ChunkAudioWanModel(get_model_preset("tiny"))
    model.init_weights(zero_head=False, zero_audio=False)
    return model


def test_encoded_clip_shapes_follow_the_chunk_layout(inputs: ModelInputs) -> None:
    # 21 frames → 6 latents = 2 chunks of 3; 32 px → 4x4 latents, 2x2 tokens; characters padded to 2.
    assert inputs.latents.shape == (4, 16, 6, 4, 4)
    assert inputs.y.shape == (4, 20, 6, 4, 4)
    assert inputs.audio_span.shape == (4, 2, 2, 7, 4, 2, 32)
    assert inputs.speaking.shape == (4, 2, 2, 3)
    assert inputs.face_mask.shape == (4, 2, 6 * 4)
    assert torch.equal(inputs.y[:, :4, 0], torch.ones(4, 4, 4, 4))  # I2V mask on the image latent


def test_y_is_the_i2v_conditioning_the_server_computes(inputs: ModelInputs) -> None:
    vae = load_or_build_vae(None, "tiny")
    reference = SyntheticTalkingDataset(DATA, seed=1).clip(2).reference
    served = I2VConditioning(vae, image_to_tensor(reference), chunk_latents=3, horizon_latents=6).clip
    torch.testing.assert_close(inputs.y[2], served, rtol=1e-4, atol=1e-5)


def test_flow_matching_target_is_noise_minus_clean_latents(inputs: ModelInputs) -> None:
    # A model that outputs exactly ε − x0 has zero loss: the target is Wan's v, not x0 − ε.
    noise = torch.randn(inputs.latents.shape)

    class Oracle(torch.nn.Module):
        def forward(self, x_t: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
            s = (t / 1000).float().view(-1, 1, 1, 1, 1)
            return (x_t - (1 - s) * inputs.latents) / s - inputs.latents  # = ε − x0

    oracle = Oracle()
    loss = flow_matching_loss(oracle, inputs, noise, torch.full((4,), 0.3))
    assert float(loss) < 1e-8
    assert float(flow_matching_loss(oracle, inputs, noise, torch.full((4,), 0.6))) < 1e-8


def test_dropped_audio_equals_the_model_without_audio_branch(inputs: ModelInputs) -> None:
    model = _model().eval()
    x = torch.randn(inputs.latents.shape)
    t = torch.full((4,), 500.0)
    keep = torch.tensor([True, False, True, False])
    with torch.no_grad():
        dropped = predict_velocity(model, x, t, inputs, keep_audio=keep)
        silent = model(x, t, context=inputs.context, clip_fea=inputs.clip_fea, y=inputs.y, audio=None)
        audible = model(
            x,
            t,
            context=inputs.context,
            clip_fea=inputs.clip_fea,
            y=inputs.y,
            audio=AudioConditioning(
                tokens=project_chunked_audio(model, inputs.audio_span, inputs.speaking),
                face_mask=inputs.face_mask,
            ),
        )
    torch.testing.assert_close(dropped[~keep], silent[~keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dropped[keep], audible[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(audible[~keep], silent[~keep], atol=1e-4)


def test_teacher_loss_decreases_on_a_fixed_seed(inputs: ModelInputs) -> None:
    torch.manual_seed(0)
    model = ChunkAudioWanModel(get_model_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(inputs.latents.shape, generator=g)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    losses = []
    for _ in range(15):
        loss = flow_matching_loss(model, inputs, noise, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_train_teacher_logs_learning_curve_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = TeacherConfig(
        data=DATA, num_clips=4, val_clips=2, steps=30, batch_size=2, warmup_steps=5, lr=2e-3,
        log_every=5, eval_every=15, save_every=15,
    )
    path = train_teacher(cfg, tmp_path)
    model, report = load_dit_checkpoint(path, get_model_preset("tiny"), strict_audio=True)
    assert path.name == "teacher.safetensors" and report.zero_initialised == ()
    records = [json.loads(line) for line in (tmp_path / "teacher_log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]
    state = torch.load(tmp_path / "teacher_state.pt", weights_only=False)
    assert state["step"] == 30
    torch.testing.assert_close(state["model"], model.state_dict())


def test_train_teacher_resumes_from_its_state(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    common = {"data": DATA, "num_clips": 2, "val_clips": 1, "batch_size": 2, "log_every": 2, "eval_every": 4}
    straight = train_teacher(TeacherConfig(steps=8, save_every=4, **common), tmp_path / "a")
    train_teacher(TeacherConfig(steps=4, save_every=4, **common), tmp_path / "b")
    resumed = train_teacher(TeacherConfig(steps=8, save_every=4, **common), tmp_path / "b", resume=True)
    a, _ = load_dit_checkpoint(straight, get_model_preset("tiny"))
    b, _ = load_dit_checkpoint(resumed, get_model_preset("tiny"))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-5, atol=1e-6)

"""Stage C (training/distill.py): the student's training forward is the inference model, and it learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from training.batches import (
    ChunkAudioWanModel,
    ClipEncoder,
    ModelInputs,
    as_training_model,
    load_or_build_vae,
)
from training.data import DataConfig, SyntheticTalkingDataset
from training.distill import (
    StudentConfig,
    critic_step_loss,
    generator_losses,
    load_teacher,
    make_student_input,
    student_rollout,
    train_student,
)
from workers.audio import AudioConditioning
from workers.checkpoint import load_dit_checkpoint
from workers.model import WanModel
from workers.streaming import StreamingDiT

DATA = DataConfig(height=32, width=32, num_frames=33, two_character_prob=0.0, silent_prob=0.0)


@pytest.fixture(scope="module")
def inputs() -> ModelInputs:
    torch.set_num_threads(1)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny"), max_characters=1)
    dataset = SyntheticTalkingDataset(DATA, seed=3)
    return encoder.encode_many([dataset.clip(0), dataset.clip(1)])


def _random_wan(seed: int) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(get_model_preset("tiny"))
    model.init_weights(zero_head=False, zero_audio=False)
    return model.eval()


def _random_model(seed: int) -> ChunkAudioWanModel:
    return as_training_model(_random_wan(seed))


def _config(**overrides: object) -> StudentConfig:
    return replace(StudentConfig(data=DATA, num_clips=2, val_clips=1, batch_size=2), **overrides)


@pytest.mark.equality
def test_student_training_forward_equals_streaming_chunk_by_chunk(inputs: ModelInputs) -> None:
    # The served model is a plain WanModel; training runs the same weights through its chunked-audio subclass.
    model = _random_wan(0)
    clip = inputs.select([0])
    cfg = _config()
    stream = StreamConfig(height=32, width=32, denoising_steps=cfg.denoising_steps)
    steps, f = len(cfg.denoising_steps), stream.chunk_latent_frames
    noise = torch.randn((steps, *clip.latents.shape), generator=torch.Generator().manual_seed(1))

    trained = student_rollout(as_training_model(model), clip, noise, cfg.schedule)[0]

    engine = StreamingDiT(model, stream)
    state = engine.open_session(clip.context[0], clip.clip_fea[0])
    tokens = stream.tokens_per_frame
    chunks = []
    for c in range(clip.num_chunks):
        frames = slice(c * f, (c + 1) * f)
        audio = AudioConditioning(
            features=clip.audio_span[:, :, c],
            speaking=clip.speaking[:, :, c],
            face_mask=clip.face_mask[:, :, c * f * tokens : (c + 1) * f * tokens],
        )
        chunk_noise = noise[:, 0, :, frames]
        chunks.append(engine.denoise_chunk(state, c, y=clip.y[0, :, frames], audio=audio, noise=chunk_noise))
    streamed = torch.cat(chunks, dim=1)
    assert clip.num_chunks == 3
    torch.testing.assert_close(trained, streamed, rtol=1e-4, atol=1e-5)


def test_generator_steps_reduce_the_regression_loss(inputs: ModelInputs) -> None:
    torch.manual_seed(0)
    cfg = _config(regression_weight=1.0, rollout_start=0, rollout_max=0.5)
    teacher = _random_model(1).requires_grad_(False)
    student, critic = _random_model(1), _random_model(1)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, betas=cfg.betas)
    ode_noise = torch.randn(inputs.latents.shape)
    ode_x0 = inputs.latents + 0.1 * torch.randn(inputs.latents.shape)

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        sample = make_student_input(student, cfg, inputs, ode_noise, ode_x0, 0, g)
        _, dmd, reg = generator_losses(student, teacher, critic, cfg, inputs, sample, g, with_grad=True)
        return dmd, reg

    _, before = losses()
    for _ in range(8):
        dmd, reg = losses()
        opt.zero_grad()
        (dmd + cfg.regression_weight * reg).backward()
        opt.step()
    _, after = losses()
    assert float(after.detach()) < 0.8 * float(before.detach())


def test_critic_steps_reduce_the_critic_loss_on_student_samples(inputs: ModelInputs) -> None:
    cfg = _config()
    critic = _random_model(2)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    samples = torch.randn(inputs.latents.shape, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        return critic_step_loss(critic, cfg, inputs, samples, torch.Generator().manual_seed(9))

    before = float(loss().detach())
    for _ in range(8):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.8 * before


def test_self_rollout_share_is_zero_before_start_then_ramps_to_max() -> None:
    cfg = _config(rollout_start=100, rollout_ramp=50, rollout_max=0.6)
    assert cfg.rollout_share(0) == 0 and cfg.rollout_share(99) == 0
    assert 0 < cfg.rollout_share(110) < 0.6
    assert cfg.rollout_share(149) == pytest.approx(0.6) and cfg.rollout_share(10_000) == pytest.approx(0.6)


def test_real_input_at_second_step_is_the_clip_noised_to_that_step(inputs: ModelInputs) -> None:
    cfg = _config(ode_fraction=0.0)
    student = _random_model(3)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        sample = make_student_input(student, cfg, inputs, inputs.latents, inputs.latents, 0, g)
        if sample.step == 1:
            break
    sigma = cfg.schedule[1][1]
    residual = (sample.x - (1 - sigma) * inputs.latents) / sigma
    assert sample.step == 1 and sample.self_rollouts == 0
    assert abs(float(residual.std()) - 1) < 0.1  # what is left is the unit Gaussian noise
    torch.testing.assert_close(sample.target, inputs.latents)


def test_train_student_writes_a_checkpoint_the_server_loads(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _config(steps=4, log_every=2, eval_every=2, save_every=2, ode_steps=2)
    path = train_student(cfg, tmp_path)
    model, report = load_dit_checkpoint(path, get_model_preset("tiny"), strict_audio=True)
    assert path.name == "student.safetensors" and report.zero_initialised == ()
    teacher = load_teacher(cfg)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert changed, "training left the student equal to its teacher initialisation"
    records = [json.loads(line) for line in (tmp_path / "student_log.jsonl").read_text().splitlines()]
    assert {"dmd", "regression", "critic", "val_ode_mse", "val_x0_mse"} <= set(records[-1])


def test_ode_pairs_are_solved_again_for_another_teacher(
    inputs: ModelInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.distill as distill
    from training.teacher import save_model

    paths = []
    for seed in (1, 2):
        paths.append(save_model(_random_model(seed), "tiny", tmp_path / f"teacher{seed}.safetensors"))
    cache = tmp_path / "ode_pairs.pt"
    cfg = _config(teacher_checkpoint=str(paths[0]), ode_steps=2)
    teacher = load_teacher(cfg)
    _, first = distill.ode_pairs(teacher, inputs, cfg, cache)
    solved = []
    real_ode = distill.teacher_ode
    monkeypatch.setattr(distill, "teacher_ode", lambda *a, **k: solved.append(1) or real_ode(*a, **k))
    _, again = distill.ode_pairs(teacher, inputs, cfg, cache)  # the same teacher and clips: from the cache
    assert not solved and torch.equal(again, first)
    other = replace(cfg, teacher_checkpoint=str(paths[1]))
    _, retrained = distill.ode_pairs(load_teacher(other), inputs, other, cache)  # a retrained teacher
    assert solved and not torch.allclose(retrained, first)
    solved.clear()
    shifted = replace(inputs, latents=inputs.latents + 0.5)  # a new VAE's latents, same shapes
    distill.ode_pairs(load_teacher(other), shifted, other, cache)
    assert solved

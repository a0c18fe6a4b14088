"""Stage A (VAE): the loss decreases, the checkpoint loads as a Wan VAE, and a killed run resumes exactly."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import training.vae_stage as vae_stage
from decoder.checkpoint import load_vae, save_vae_checkpoint
from proto.vae_config import get_vae_preset
from training.checkpointing import load_training_state, save_training_state
from training.data import DataConfig, SyntheticTalkingDataset
from training.vae_stage import (
    StreamCaches,
    VAEStageConfig,
    build_trainable_vae,
    decode_latents,
    encode_posterior,
    image_dataset,
    inflate_image_vae,
    latent_statistics,
    mouth_motion_l1,
    normalised_kl,
    sample_batch,
    sample_images,
    sample_stream,
    standardise_latents,
    train_vae,
    vae_loss,
)

SMALL = VAEStageConfig(
    data=DataConfig(height=32, width=32, num_frames=9),
    steps=4,
    minutes_budget=None,
    batch_size=2,
    clip_frames=5,
    stream_windows=2,
    warmup_steps=1,
    eval_every=100,
    eval_clips=1,
    save_every=2,
    log_every=1,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_loss_decreases_on_a_fixed_batch() -> None:
    vae = build_trainable_vae(SMALL)
    video, mouth = sample_batch(SyntheticTalkingDataset(SMALL.data, seed=0), SMALL, step=0)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same posterior noise every step: only the weights change
        loss, _ = vae_loss(vae, video, mouth, SMALL)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]


def test_kl_vanishes_when_the_posterior_is_the_normalised_prior() -> None:
    vae = build_trainable_vae(SMALL)
    cfg = get_vae_preset("tiny")
    shape = (1, cfg.z_dim, 2, 4, 4)
    mean = torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1).expand(shape)
    std = torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1).expand(shape)
    assert float(normalised_kl(vae, mean, 2 * std.log())) == pytest.approx(0.0, abs=1e-6)
    assert float(normalised_kl(vae, mean + std, 2 * std.log())) == pytest.approx(0.5, rel=1e-5)


def test_the_mouth_motion_term_penalises_a_mouth_averaged_over_each_latent_frame() -> None:
    # A mouth box (rows 2-3, cols 2-4) whose darkness changes every frame, and a reconstruction that holds
    # each latent frame's average (frames 1-4, 5-8): the motion term counts the frame-to-frame changes
    # inside each latent frame that the reconstruction lost.
    t, h, w = 9, 8, 8
    video = torch.zeros(1, 3, t, h, w)
    darkness = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 0.5, -0.5])
    video[:, :, :, 2:4, 2:5] = darkness.view(1, 1, t, 1, 1)
    mouth = torch.zeros(1, 1, t, h, w)
    mouth[:, :, :, 2:4, 2:5] = 1.0
    averaged = video.clone()
    for first in (1, 5):
        averaged[:, :, first : first + 4] = video[:, :, first : first + 4].mean(dim=2, keepdim=True)
    assert float(mouth_motion_l1(video, video, mouth)) == 0.0
    # the 8 differences the average drops: 1, -2, 2, -2, then 1.5 (from the first average), -1, 1, -1
    expected = (1 + 2 + 2 + 2 + 1.5 + 1 + 1 + 1) / 8
    assert float(mouth_motion_l1(averaged, video, mouth)) == pytest.approx(expected, rel=1e-6)
    # motion outside the mouth boxes is not its business
    elsewhere = video.clone()
    elsewhere[:, :, 1::2, 6:, 6:] += 1.0
    assert float(mouth_motion_l1(elsewhere, video, mouth)) == 0.0
    # and the loss carries it with its weight
    cfg = dataclasses.replace(SMALL, mouth_motion_weight=2.0)
    vae = build_trainable_vae(cfg)
    torch.manual_seed(0)
    with_motion, parts = vae_loss(vae, video, mouth, cfg)
    torch.manual_seed(0)
    without, _ = vae_loss(vae, video, mouth, SMALL)
    assert float((with_motion - without).detach()) == pytest.approx(2.0 * parts["motion"], rel=1e-5)


def test_every_kth_stream_is_cut_to_squares_on_the_speakers_mouth() -> None:
    cfg = dataclasses.replace(SMALL, mouth_stream_every=2, mouth_crop=16, batch_size=3)
    dataset = SyntheticTalkingDataset(cfg.data, seed=0)
    video, mouth = sample_stream(dataset, cfg, 0)  # an ordinary stream: whole 32 px frames
    assert video.shape[-2:] == (32, 32)
    video, mouth = sample_stream(dataset, cfg, 1)  # a mouth stream
    assert video.shape == (3, 3, cfg.stream_frames, 16, 16) and mouth.shape[-2:] == (16, 16)
    speaking = [b for b in range(3) if dataset.clip(cfg.batch_size + b).speaker >= 0]
    assert speaking and all(float(mouth[b, :, 0].sum()) > 0 for b in speaking)  # the mouth is in the square
    with pytest.raises(ValueError, match="mouth_crop"):
        dataclasses.replace(SMALL, mouth_crop=12)


def test_batches_are_a_function_of_the_step() -> None:
    ds = SyntheticTalkingDataset(SMALL.data, seed=0)
    a, ma = sample_batch(ds, SMALL, step=3)
    b, mb = sample_batch(ds, SMALL, step=3)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    # step 3 is the second window of stream 1: frames 5..8 of its clips, continuing step 2's frames 0..4
    assert a.shape == (2, 3, 4, 32, 32) and ma.shape == (2, 1, 4, 32, 32)
    first, _ = sample_batch(ds, SMALL, step=2)
    assert first.shape == (2, 3, 5, 32, 32)
    assert not torch.equal(first, sample_batch(ds, SMALL, step=4)[0])
    whole, _ = sample_stream(ds, SMALL, 1)
    assert torch.equal(torch.cat([first, a], dim=2), whole)


def test_streamed_windows_see_what_one_pass_over_the_stream_sees() -> None:
    """Training a stream window by window through the caches computes the one-pass encode/decode of the
    whole stream: the cache state a window is trained in is the real one."""
    vae = build_trainable_vae(SMALL).eval()
    with torch.no_grad():  # give the zero-initialised residual branches something to carry across windows
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = SyntheticTalkingDataset(SMALL.data, seed=0)
    video, _ = sample_stream(ds, SMALL, 0)
    with torch.no_grad():
        mu_all, _ = encode_posterior(vae, video)
        recon_all = decode_latents(vae, mu_all)
        caches = StreamCaches()
        mus, recons = [], []
        for step in range(SMALL.stream_windows):
            mu, _ = encode_posterior(vae, video[:, :, SMALL.window(step)], caches.encoder)
            recons.append(decode_latents(vae, mu, caches.decoder))
            mus.append(mu)
    torch.testing.assert_close(torch.cat(mus, dim=2), mu_all, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(recons, dim=2), recon_all, rtol=1e-4, atol=1e-5)


def test_a_stream_window_trains_through_the_detached_caches() -> None:
    """A later window's loss back-propagates into the weights (not into the previous window's graph)."""
    vae = build_trainable_vae(SMALL)
    ds = SyntheticTalkingDataset(SMALL.data, seed=0)
    video, mouth = sample_stream(ds, SMALL, 0)
    caches = StreamCaches()
    for step in range(SMALL.stream_windows):
        window = SMALL.window(step)
        loss, _ = vae_loss(vae, video[:, :, window], mouth[:, :, window], SMALL, caches)
        vae.zero_grad()
        loss.backward()
        caches.detach()
        assert all(p.grad is not None for p in vae.decoder.parameters())


def test_training_state_round_trip_restores_model_optimizer_step_and_rngs(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_training_state(tmp_path / "s.pt", model=model, optimizer=opt, step=7, extra={"elapsed_s": 1.5})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    step, extra = load_training_state(tmp_path / "s.pt", model=other, optimizer=other_opt)
    assert step == 7 and extra == {"elapsed_s": 1.5}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_train_vae_writes_a_checkpoint_that_load_vae_reads(tmp_path: Path) -> None:
    path = train_vae(vae_stage.VAEStageConfig(**{**SMALL.__dict__, "steps": 2}), tmp_path)
    loaded = load_vae(path, get_vae_preset("tiny"))
    state = torch.load(tmp_path / "vae_state.pt", weights_only=True)
    assert state["step"] == 2
    trained = build_trainable_vae(SMALL).eval()
    trained.load_state_dict(state["model"])
    # the checkpoint is the trained VAE with its latents standardised: same reconstructions
    video, _ = sample_stream(SyntheticTalkingDataset(SMALL.data, seed=0), SMALL, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.decode(loaded.encode(video)), trained.decode(trained.encode(video)), rtol=1e-3, atol=1e-4
        )
    log = (tmp_path / "vae_log.jsonl").read_text()
    assert '"event": "eval", "step": 0' in log and '"event": "eval", "step": 2' in log


def test_a_run_can_start_from_another_runs_state_with_a_fresh_schedule(tmp_path: Path) -> None:
    first = dataclasses.replace(SMALL, steps=4)
    train_vae(first, tmp_path / "a")
    second = dataclasses.replace(
        SMALL, steps=2, image_fraction=0.0, init_state=str(tmp_path / "a" / "vae_state.pt"), lr=1e-3
    )
    train_vae(second, tmp_path / "b")
    events = [json.loads(line) for line in (tmp_path / "b" / "vae_log.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    last_of_first = [
        json.loads(line) for line in (tmp_path / "a" / "vae_log.jsonl").read_text().splitlines()
        if '"eval"' in line
    ][-1]
    assert evals[0]["step"] == 0 and evals[0]["psnr"] == pytest.approx(last_of_first["psnr"], abs=1e-9)
    assert trains[0]["step"] == 1 and trains[0]["lr"] == pytest.approx(1e-3)  # the schedule starts over
    assert torch.load(tmp_path / "b" / "vae_state.pt", weights_only=True)["step"] == 2
    state = torch.load(tmp_path / "a" / "vae_state.pt", weights_only=True)
    state["extra"]["stream_start"] = None  # a state saved in the image phase
    torch.save(state, tmp_path / "image.pt")
    with pytest.raises(ValueError, match="image phase"):
        train_vae(dataclasses.replace(second, init_state=str(tmp_path / "image.pt")), tmp_path / "c")


def test_espeak_fraction_overrides_the_data_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data

    monkeypatch.setattr(training.data.shutil, "which", lambda name: "/usr/bin/" + name)
    cfg = dataclasses.replace(SMALL, espeak_fraction=0.5)
    assert cfg.data.espeak_fraction == 0.5 and cfg.data.num_frames == SMALL.data.num_frames
    monkeypatch.setattr(training.data.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="espeak-ng"):
        dataclasses.replace(SMALL, espeak_fraction=0.5)


def test_standardising_the_latents_is_an_exact_reparametrisation() -> None:
    vae = build_trainable_vae(SMALL).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    video, _ = sample_stream(SyntheticTalkingDataset(SMALL.data, seed=0), SMALL, 0)
    with torch.no_grad():
        z = vae.encode(video)
        mean, std = latent_statistics(vae, video)
        folded = copy.deepcopy(vae)
        standardise_latents(folded, mean, std)
        z_folded = folded.encode(video)
        shape = (1, -1, 1, 1, 1)
        torch.testing.assert_close(z_folded, (z - mean.view(shape)) / std.view(shape), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.decode(z_folded), vae.decode(z), rtol=1e-4, atol=1e-4)
        per_channel = z_folded.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=1), torch.ones(16), atol=1e-3, rtol=0)
    # the posterior's variance is rescaled with the mean: log-variance shifted by -2 log std
    with torch.no_grad():
        _, logvar = encode_posterior(vae, video)
        _, logvar_folded = encode_posterior(folded, video)
    torch.testing.assert_close(logvar_folded, logvar - 2 * std.log().view(shape), rtol=1e-4, atol=1e-4)


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = torch.load(train_vae(SMALL, tmp_path / "straight"), weights_only=True)

    real_step = vae_stage._train_step
    calls = {"n": 0}

    def dies_on_the_fourth_step(*args, **kwargs):  # after the step-2 save, during step 4
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vae_stage, "_train_step", dies_on_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        train_vae(SMALL, tmp_path / "killed")
    monkeypatch.setattr(vae_stage, "_train_step", real_step)
    resumed = torch.load(train_vae(SMALL, tmp_path / "killed", resume=True), weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_an_inflated_image_vae_reconstructs_a_still_video_as_it_reconstructs_the_frame() -> None:
    vae = build_trainable_vae(SMALL).eval()
    with torch.no_grad():
        for p in vae.parameters():  # every tap, the temporal ones too, so that inflation has work to do
            p.add_(0.05 * torch.randn_like(p))
    frame, _ = sample_images(image_dataset(SyntheticTalkingDataset(SMALL.data, seed=0), SMALL), SMALL, 0)
    frame = frame[:1]  # [1, 3, 1, 32, 32]
    still = frame.expand(-1, -1, 9, -1, -1).contiguous()
    with torch.no_grad():
        image = decode_latents(vae, encode_posterior(vae, frame)[0])
        before = vae.decode(vae.encode(still))
        inflate_image_vae(vae)
        after_image = decode_latents(vae, encode_posterior(vae, frame)[0])
        streamed = vae.decode(vae.encode(still))  # the cached inference path
        one_pass = decode_latents(vae, encode_posterior(vae, still)[0])
    torch.testing.assert_close(after_image, image)  # inflation leaves the image VAE as it was
    assert streamed.shape == one_pass.shape == still.shape
    for t in range(9):
        torch.testing.assert_close(streamed[:, :, t], image[:, :, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(one_pass[:, :, t], image[:, :, 0], rtol=1e-4, atol=1e-5)
    assert (before[:, :, 1:] - image).abs().max() > 1e-2  # not so before inflation


def test_image_batches_are_a_function_of_the_step() -> None:
    images = image_dataset(SyntheticTalkingDataset(SMALL.data, seed=0), SMALL)
    a, ma = sample_images(images, SMALL, 3)
    b, mb = sample_images(images, SMALL, 3)
    c, _ = sample_images(images, SMALL, 4)
    assert a.shape == (SMALL.image_batch, 3, 1, 32, 32) and ma.shape == (SMALL.image_batch, 1, 1, 32, 32)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    assert len({tuple(x.flatten()[:64].tolist()) for x in a}) == SMALL.image_batch  # one clip per frame


def test_stage_a_trains_on_images_then_inflates_and_trains_on_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = VAEStageConfig(**{**SMALL.__dict__, "steps": 5, "image_fraction": 0.5, "image_batch": 3})
    frames_per_step = []
    real_step = vae_stage._train_step

    def record(vae, opt, video, mouth, cfg_, caches):
        frames_per_step.append((video.shape[0], video.shape[2], caches is None))
        return real_step(vae, opt, video, mouth, cfg_, caches)

    monkeypatch.setattr(vae_stage, "_train_step", record)
    train_vae(cfg, tmp_path)
    # 3 image steps (step < 2.5) of one frame from each of 3 clips, then stream windows of 2 clips
    assert frames_per_step == [(3, 1, True)] * 3 + [(2, 5, False), (2, 4, False)]
    events = [json.loads(line) for line in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "inflate"] == [3]
    evals = [e for e in events if e["event"] == "eval"]
    assert [(e["step"], e["phase"]) for e in evals] == [(0, "image"), (5, "stream")]
    assert torch.load(tmp_path / "vae_state.pt", weights_only=True)["extra"]["stream_start"] == 3


def test_the_streams_start_with_a_second_warm_up() -> None:
    cfg = VAEStageConfig(steps=1000, minutes_budget=None, warmup_steps=10, inflate_warmup_steps=50)
    steady = vae_stage.learning_rate(cfg, 400, 0.0)
    assert vae_stage.learning_rate(cfg, 400, 0.0, stream_start=400) == pytest.approx(steady / 50)
    assert vae_stage.learning_rate(cfg, 424, 0.0, stream_start=400) == pytest.approx(
        vae_stage.learning_rate(cfg, 424, 0.0) * 25 / 50
    )
    assert vae_stage.learning_rate(cfg, 460, 0.0, stream_start=400) == vae_stage.learning_rate(cfg, 460, 0.0)
    assert vae_stage.learning_rate(cfg, 5, 0.0, stream_start=0) == vae_stage.learning_rate(cfg, 5, 0.0)


def test_the_compare_command_scores_each_checkpoint_on_the_same_clips(tmp_path: Path) -> None:
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    vae = build_trainable_vae(SMALL).eval()
    save_vae_checkpoint(vae, first)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_vae_checkpoint(vae, second)
    out, still = tmp_path / "cmp.json", tmp_path / "cmp.png"
    assert vae_stage.main([str(first), str(second), str(first), "--clips", "1", "--out", str(out),
                           "--still", str(still)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["vaes"]
    assert [r["checkpoint"] for r in rows] == [str(first), str(second), str(first)]
    assert rows[0]["psnr"] == rows[2]["psnr"] != rows[1]["psnr"]
    from PIL import Image

    assert Image.open(still).size == (2 * 4 * 4 * 64, 2 * 4 * 64)  # 4 clips x 4 frames; truth + 3 rows
    assert vae_stage.main([str(tmp_path / "missing.pth")]) == 2
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert vae_stage.main([str(tmp_path / "junk.pth")]) == 2


def test_the_compare_command_can_voice_the_clips_with_espeak(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.pth"
    save_vae_checkpoint(build_trainable_vae(SMALL).eval(), path)
    if shutil.which("espeak-ng") is not None:
        numpy_voice = vae_stage.compare_vaes([path], 2)
        real_speech = vae_stage.compare_vaes([path], 2, espeak=True)
        # the same held-out characters, their mouths driven by other audio: other frames, other scores
        assert real_speech[0]["psnr"] != numpy_voice[0]["psnr"]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert vae_stage.main([str(path), "--espeak"]) == 2  # a clear error without espeak-ng

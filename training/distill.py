"""Stage C: asymmetric distillation of the bidirectional teacher into the sparse-causal 2-step student
(paper §4.2, TM's modified CausVid; recipe facts in audio_and_distillation.md §3).

The student is exactly the inference model: `workers.model.WanModel` run over K chunks of F = 3 latent
frames with `workers.streaming.sparse_causal_mask` (chunk c sees c_0, c_{c−1}, c_c), one timestep shared
by every chunk, absolute positions, audio tokens projected chunk by chunk from each chunk's own span.
That full-sequence forward is what `StreamingDiT` in `per-step` cache mode computes chunk by chunk
(tests/training/test_distill.py checks the equality), so the checkpoint is served unchanged.

One iteration (batch of clips, one step index s of the student's schedule, e.g. t = (1000, 833) for the
default (1000, 500) warped with shift 5):

1. Student input x_s for every chunk:
   - s = 0: Gaussian noise;
   - s > 0, per clip: "real" — the clip's latents noised to σ_s (teacher-forced context), or "self" — the
     student's own no-grad rollout of steps 0 … s − 1 re-noised to σ_s (DMD2 backward simulation).
     Progressive mixing: only real inputs until `rollout_start`, then the share of self rollouts ramps
     linearly to `rollout_max` over `rollout_ramp` iterations.
   The noise of the pure-noise step is, per clip with probability `ode_fraction`, the clip's fixed ODE
   noise, whose teacher ODE solution (precomputed once, `teacher_ode`) is the regression target.
2. Student x0 = x_s − σ_s·v under the sparse mask (with gradient on generator iterations).
3. Generator loss = DMD (teacher with audio guidance as real score, critic as fake score, at a fresh
   σ ~ shifted U[0.02, 0.98]) + λ·regression (MSE to the clip's latents for "real" inputs, to the teacher
   ODE endpoint for ODE-noise inputs; no target otherwise). No GAN.
4. Critic (fake score, initialised from the teacher, bidirectional): flow-matching loss on the detached
   student x0. Two-timescale: the critic is updated every iteration, the generator every
   `critic_updates_per_generator_step`-th iteration (CausVid/Self-Forcing dfake_gen_update_ratio), each
   with its own learning rate.

Outputs in `out_dir`: `student.safetensors` (Wan layout; `talkingmachines run --checkpoint` loads it),
`student_state.pt` (resumable), `student_log.jsonl` (dmd, regression, critic losses, self-rollout count and
share; every `eval_every`: `val_ode_mse` = MSE of the student's 2-step samples to the teacher's guided ODE
samples from the same noise on held-out clips, and `val_x0_mse` to the clips' latents), the ODE pairs.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from training.batches import (
    ChunkAudioWanModel,
    ClipEncoder,
    ModelInputs,
    as_training_model,
    load_or_build_vae,
    token_weight,
    vae_identity,
)
from training.data import DataConfig
from training.devices import check_device
from training.dmd import (
    critic_loss,
    dmd_loss,
    guided_velocity,
    noise_to,
    sample_dmd_sigma,
    x0_from_velocity,
)
from training.fsdp import FSDPConfig, mean_over_ranks, rank_slice, world
from training.teacher import (
    JsonlLog,
    load_clip_inputs,
    load_state,
    out_of_time,
    predict_velocity,
    prepare_for_world,
    save_model,
)
from workers.checkpoint import load_dit_checkpoint
from workers.sampler import denoising_schedule, shift_sigma
from workers.streaming import sparse_causal_mask

STUDENT_FILE = "student.safetensors"
_DEFAULT_STREAM = StreamConfig()


@dataclass(frozen=True)
class StudentConfig:
    """Stage C settings; defaults fit ~20 min on 2 CPU cores at the data set's default size.

    teacher_checkpoint: stage B's `teacher.safetensors` (None = a seeded random teacher, tests only).
    cache_dir: where the encoded clips are cached (None = the teacher checkpoint's directory, which reuses
    stage B's files when data and VAE match, else out_dir).
    steps: iterations (each trains the critic; every `critic_updates_per_generator_step`-th also the student).
    minutes_budget: stop early (and save) once training has run this long; None = run all steps.
    denoising_steps / timestep_shift / warp_denoising_steps: the student's schedule, as in StreamConfig.
    guidance_scale: audio CFG of the real score (standard form, 1 = none).
    device / data_workers / vae_batch: as in TeacherConfig. ode_batch: clips per batch of the teacher ODE
    solves (`ode_pairs`).
    """

    data: DataConfig | None = None
    vae_checkpoint: str | None = None
    cache_dir: str | None = None
    teacher_checkpoint: str | None = None
    vae_preset: str = "tiny"
    preset: str = "tiny"
    chunk_latents: int = _DEFAULT_STREAM.chunk_latent_frames
    denoising_steps: tuple[int, ...] = _DEFAULT_STREAM.denoising_steps
    timestep_shift: float = _DEFAULT_STREAM.timestep_shift
    warp_denoising_steps: bool = _DEFAULT_STREAM.warp_denoising_steps
    max_characters: int = 2
    num_clips: int = 256
    val_clips: int = 8
    steps: int = 3000
    minutes_budget: float | None = None
    batch_size: int = 8
    generator_lr: float = 2e-4
    critic_lr: float = 4e-4
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    critic_updates_per_generator_step: int = 2
    grad_clip: float = 10.0
    guidance_scale: float = 3.0
    dmd_shift: float = 5.0
    regression_weight: float = 0.5
    mouth_weight: float = 8.0
    ode_fraction: float = 0.5
    ode_steps: int = 16
    rollout_start: int = 600
    rollout_ramp: int = 600
    rollout_max: float = 0.5
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    device: str = "cpu"
    data_workers: int = 0
    vae_batch: int = 16
    ode_batch: int = 16

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.data_workers < 0:
            raise ValueError(f"StudentConfig.data_workers must be >= 0, got {self.data_workers}")
        StreamConfig(
            chunk_latent_frames=self.chunk_latents,
            denoising_steps=self.denoising_steps,
            timestep_shift=self.timestep_shift,
        )
        for name in ("steps", "batch_size", "critic_updates_per_generator_step", "ode_steps", "vae_batch",
                     "ode_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"StudentConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ode_fraction", "rollout_max"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"StudentConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def schedule(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(timesteps, σ) of the student's steps, exactly as StreamingDiT computes them."""
        return denoising_schedule(self.denoising_steps, self.timestep_shift, self.warp_denoising_steps)

    def rollout_share(self, iteration: int) -> float:
        """Probability that a clip's input at a step s > 0 is the student's own rollout (progressive mix)."""
        if iteration < self.rollout_start:
            return 0.0
        ramp = min(1.0, (iteration - self.rollout_start + 1) / max(1, self.rollout_ramp))
        return self.rollout_max * ramp


def student_mask(inputs: ModelInputs, device: torch.device | str | None = None) -> torch.Tensor:
    """The sparse-causal mask `[L·S, L·S]` for the clips' K chunks (S tokens per latent frame), on `device`
    (default: the clips')."""
    h, w = inputs.latents.shape[3] // 2, inputs.latents.shape[4] // 2
    device = inputs.latents.device if device is None else device
    return sparse_causal_mask(inputs.num_chunks, inputs.chunk_latents * h * w, device)


def student_x0(
    student: nn.Module,
    x: torch.Tensor,
    timestep: float,
    sigma: float,
    inputs: ModelInputs,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The student's x0 `[B, 16, L, h, w]` from x at one shared step (timestep, σ) under the sparse mask."""
    t = torch.full((x.shape[0],), timestep, dtype=torch.float64, device=x.device)
    v = predict_velocity(student, x, t, inputs, attn_mask=mask)
    return x0_from_velocity(x, v, torch.full((x.shape[0],), sigma, device=x.device))


@torch.no_grad()
def student_rollout(
    student: nn.Module,
    inputs: ModelInputs,
    noise: torch.Tensor,
    schedule: tuple[tuple[float, ...], tuple[float, ...]],
    num_steps: int | None = None,
) -> torch.Tensor:
    """The few-step sampler over whole clips (`workers.streaming.full_sequence_denoise` batched).

    noise `[S, B, 16, L, h, w]`: noise[0] is x at step 0, noise[s] re-noises to step s. Runs steps
    0 … num_steps − 1 (default all) and returns the last x0 `[B, 16, L, h, w]`.
    """
    timesteps, sigmas = schedule
    steps = len(timesteps) if num_steps is None else num_steps
    mask = student_mask(inputs, noise.device)
    x = noise[0]
    x0 = x
    for s in range(steps):
        x0 = student_x0(student, x, timesteps[s], sigmas[s], inputs, mask)
        if s + 1 < len(timesteps):
            x = noise_to(x0, torch.full((x.shape[0],), sigmas[s + 1], device=x.device), noise[s + 1])
    return x0


@torch.no_grad()
def teacher_ode(
    teacher: nn.Module,
    inputs: ModelInputs,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    guidance_scale: float,
) -> torch.Tensor:
    """Euler solution of the teacher's probability-flow ODE from noise `[B, 16, L, h, w]` at σ = 1 to σ = 0
    on the shifted grid σ_k = shift(1 − k/steps), with audio guidance. Returns x0 `[B, 16, L, h, w]`."""
    grid = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    x = noise.double()
    for k in range(steps):
        sigma = torch.full((x.shape[0],), float(grid[k]), device=x.device)
        v = guided_teacher_velocity(teacher, x.float(), sigma, inputs, guidance_scale)
        x = x + (grid[k + 1] - grid[k]) * v.double()
    return x.float()


def guided_teacher_velocity(
    teacher: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, inputs: ModelInputs, scale: float
) -> torch.Tensor:
    """Real score: v_no_audio + scale·(v_cond − v_no_audio), two bidirectional teacher forwards."""
    t = sigma.double() * 1000
    v_cond = predict_velocity(teacher, x_t, t, inputs)
    if scale == 1.0:
        return v_cond
    no_audio = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device)
    v_uncond = predict_velocity(teacher, x_t, t, inputs, keep_audio=no_audio)
    return guided_velocity(v_cond, v_uncond, scale)


@dataclass
class StudentInput:
    """One iteration's student input: x at step `step` `[B, 16, L, h, w]`, regression targets and weights."""

    x: torch.Tensor
    step: int
    target: torch.Tensor
    target_weight: torch.Tensor  # [B] 1 where `target` is defined
    self_rollouts: int


def make_student_input(
    student: nn.Module,
    cfg: StudentConfig,
    inputs: ModelInputs,
    ode_noise: torch.Tensor,
    ode_x0: torch.Tensor,
    iteration: int,
    g: torch.Generator,
) -> StudentInput:
    """Step 1 of the iteration (module docstring): the student's input at a random shared step."""
    timesteps, sigmas = cfg.schedule
    b = inputs.batch_size
    dev = inputs.latents.device  # random draws on the CPU generator `g`, then moved: same on every device
    step = int(torch.randint(len(timesteps), (1,), generator=g))
    use_ode = (torch.rand(b, generator=g) < cfg.ode_fraction).to(dev)
    fresh = torch.randn(inputs.latents.shape, generator=g).to(dev)
    start = torch.where(use_ode.view(-1, 1, 1, 1, 1), ode_noise, fresh)
    renoise = torch.randn((len(timesteps), *inputs.latents.shape), generator=g).to(dev)
    renoise[0] = start
    self_roll = (torch.rand(b, generator=g) < cfg.rollout_share(iteration)).to(dev)
    weight = use_ode.float()
    target = ode_x0.clone()
    if step == 0:
        return StudentInput(start, 0, target, weight, 0)
    sigma = torch.full((b,), sigmas[step], device=dev)
    x = noise_to(inputs.latents, sigma, renoise[step])
    target = torch.where(self_roll.view(-1, 1, 1, 1, 1), ode_x0, inputs.latents)
    weight = torch.where(self_roll, use_ode.float(), torch.ones(b, device=dev))
    if bool(self_roll.any()):
        idx = torch.nonzero(self_roll).flatten()
        sub = inputs.select(idx)
        rolled = student_rollout(student, sub, renoise[:, idx], cfg.schedule, num_steps=step)
        x[idx] = noise_to(rolled, sigma[idx], renoise[step][idx])
    return StudentInput(x, step, target, weight, int(self_roll.sum()))


def load_teacher(cfg: StudentConfig) -> ChunkAudioWanModel:
    """Stage B's teacher (frozen, eval), or a seeded random one when `teacher_checkpoint` is None."""
    model_cfg = get_model_preset(cfg.preset)
    if cfg.teacher_checkpoint is not None:
        teacher, _ = load_dit_checkpoint(cfg.teacher_checkpoint, model_cfg, strict_audio=True)
        return as_training_model(teacher.to(check_device(cfg.device)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        teacher = ChunkAudioWanModel(model_cfg)
        teacher.init_weights(zero_head=False, zero_audio=False)
    return teacher.to(check_device(cfg.device)).eval().requires_grad_(False)


def ode_pairs_key(inputs: ModelInputs, cfg: StudentConfig) -> str:
    """What the ODE pairs depend on: the teacher (its checkpoint's content), the clips (their latents and
    conditioning) and the solver's settings, as one SHA-256."""
    digest = hashlib.sha256(vae_identity(cfg.teacher_checkpoint, cfg.seed).encode())  # any file's content
    for name in ("latents", "y", "audio_span", "speaking", "face_mask", "clip_fea", "context"):
        digest.update(getattr(inputs, name).detach().float().cpu().contiguous().numpy().tobytes())
    settings = (cfg.seed, cfg.ode_steps, cfg.timestep_shift, cfg.guidance_scale)
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def ode_pairs(
    teacher: nn.Module, inputs: ModelInputs, cfg: StudentConfig, cache: Path, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, teacher ODE x0) `[N, 16, L, h, w]` per training clip, computed once and cached (keyed by
    `ode_pairs_key`: a retrained teacher, a new VAE's latents or other solver settings solve again); on the
    clips' device."""
    dev = inputs.latents.device
    key = ode_pairs_key(inputs, cfg)
    if cache.is_file():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        if state.get("key") == key:
            return state["noise"].to(dev), state["x0"].to(dev)
        if world()[0] == 0:
            print(f"note: {cache} was solved for another teacher, other clips or settings; solving again",
                  file=sys.stderr)  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed + 7)
    noise = torch.randn(inputs.latents.shape, generator=g).to(dev)
    x0 = torch.cat(
        [
            teacher_ode(
                teacher,
                inputs.select(slice(i, i + chunk)),
                noise[i : i + chunk],
                cfg.ode_steps,
                cfg.timestep_shift,
                cfg.guidance_scale,
            )
            for i in range(0, inputs.batch_size, chunk)
        ]
    )
    if world()[0] == 0:
        torch.save({"noise": noise.cpu(), "x0": x0.cpu(), "steps": cfg.ode_steps, "key": key}, cache)
    return noise, x0


def generator_losses(
    student: nn.Module,
    teacher: nn.Module,
    critic: nn.Module,
    cfg: StudentConfig,
    inputs: ModelInputs,
    sample: StudentInput,
    g: torch.Generator,
    *,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student x0, DMD loss, regression loss) for one student input; losses carry grad when `with_grad`."""
    timesteps, sigmas = cfg.schedule
    mask = student_mask(inputs)
    with torch.set_grad_enabled(with_grad):
        x0 = student_x0(student, sample.x, timesteps[sample.step], sigmas[sample.step], inputs, mask)
    b = inputs.batch_size
    sigma = sample_dmd_sigma(b, cfg.dmd_shift, generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    if not with_grad:
        return x0, torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        x_t = noise_to(x0.detach(), sigma, noise)
        v_real = guided_teacher_velocity(teacher, x_t, sigma, inputs, cfg.guidance_scale)
        v_fake = predict_velocity(critic, x_t, sigma.double() * 1000, inputs)
    loss_dmd = dmd_loss(x0, x_t, sigma, v_real, v_fake).float()
    weight = token_weight(inputs, cfg.mouth_weight)
    per_clip = ((x0 - sample.target).pow(2) * weight).flatten(1).mean(dim=1) / weight.flatten(1).mean(dim=1)
    loss_reg = (per_clip * sample.target_weight).sum() / sample.target_weight.sum().clamp(min=1.0)
    return x0, loss_dmd, loss_reg


def critic_step_loss(
    critic: nn.Module, cfg: StudentConfig, inputs: ModelInputs, x0: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss of the critic on detached student samples x0 `[B, 16, L, h, w]`."""
    sigma = sample_dmd_sigma(inputs.batch_size, cfg.dmd_shift, generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = noise_to(x0.detach(), sigma, noise)
    v = predict_velocity(critic, x_t, sigma.double() * 1000, inputs)
    return critic_loss(v, noise, x0)


class Validation:
    """Fixed-noise evaluation on held-out clips: the student's full few-step samples against the teacher's
    ODE solutions from the same initial noise (`val_ode_mse`, what distillation drives down) and against the
    clips' own latents (`val_x0_mse`)."""

    def __init__(self, teacher: nn.Module, cfg: StudentConfig, val: ModelInputs) -> None:
        g = torch.Generator().manual_seed(cfg.seed + 11)
        self.cfg = cfg
        self.val = val
        noise = torch.randn((len(cfg.denoising_steps), *val.latents.shape), generator=g)
        self.noise = noise.to(val.latents.device)
        self.ode_x0 = teacher_ode(
            teacher, val, self.noise[0], cfg.ode_steps, cfg.timestep_shift, cfg.guidance_scale
        )

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        x0 = student_rollout(student, self.val, self.noise, self.cfg.schedule)
        return {
            "val_ode_mse": float((x0 - self.ode_x0).pow(2).mean()),
            "val_x0_mse": float((x0 - self.val.latents).pow(2).mean()),
        }


def train_student(cfg: StudentConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Distil the teacher into the sparse-causal student; returns `student.safetensors` (Wan layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()  # the budget covers set-up (encoding, ODE pairs) too
    rank, world_size = world()
    torch.manual_seed(cfg.seed)
    device = check_device(cfg.device)
    model_cfg = get_model_preset(cfg.preset)
    vae = load_or_build_vae(cfg.vae_checkpoint, cfg.vae_preset, cfg.seed).to(device)
    encoder = ClipEncoder(
        model_cfg, vae, chunk_latents=cfg.chunk_latents, max_characters=cfg.max_characters, seed=0
    )
    cache_dir = out
    if cfg.cache_dir is not None:
        cache_dir = Path(cfg.cache_dir)
    elif cfg.teacher_checkpoint is not None:
        cache_dir = Path(cfg.teacher_checkpoint).parent
    train, val = load_clip_inputs(
        cfg.data, encoder, cfg.num_clips, cfg.val_clips, cache_dir, cfg.seed, cfg.vae_checkpoint,
        cfg.data_workers, cfg.vae_batch,
    )  # fmt: skip
    del encoder, vae
    train, val = train.to(device), val.to(device)
    teacher = load_teacher(cfg)
    ode_noise, ode_x0 = ode_pairs(teacher, train, cfg, out / "ode_pairs.pt", chunk=cfg.ode_batch)
    validation = Validation(teacher, cfg, val)

    student = ChunkAudioWanModel(model_cfg).to(device)
    critic = ChunkAudioWanModel(model_cfg).to(device)
    student.load_state_dict(teacher.state_dict())
    critic.load_state_dict(teacher.state_dict())
    state_path = out / "student_state.pt"
    state = load_state(state_path) if resume and state_path.is_file() else None
    if state is not None:
        student.load_state_dict(state["student"])
        critic.load_state_dict(state["critic"])
    student = prepare_for_world(student, cfg.fsdp)
    critic = prepare_for_world(critic, cfg.fsdp)
    teacher = prepare_for_world(teacher, cfg.fsdp)  # frozen, sharded too (SCALE_OUT.md)
    gen_opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.generator_lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    critic_opt = torch.optim.AdamW(
        critic.parameters(), lr=cfg.critic_lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    start = 0
    if state is not None:
        if world_size == 1:
            gen_opt.load_state_dict(state["generator_optimizer"])
            critic_opt.load_state_dict(state["critic_optimizer"])
        start = int(state["iteration"])
    log = JsonlLog(out / "student_log.jsonl", append=state is not None)
    if state is None:
        log.write(event="config", **{k: str(v) for k, v in asdict(cfg).items()})
        log.write(step=0, **validation(student))

    def save_state(iteration: int) -> None:
        torch.save(
            {
                "student": student.state_dict(),
                "critic": critic.state_dict(),
                "generator_optimizer": gen_opt.state_dict(),
                "critic_optimizer": critic_opt.state_dict(),
                "iteration": iteration,
            },
            state_path,
        )

    done = start
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    bar = tqdm(range(start, cfg.steps), desc="student", disable=rank != 0, initial=start,
               total=cfg.steps)
    for it in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
        idx = torch.randint(train.batch_size, (cfg.batch_size,), generator=g)[rank_slice(cfg.batch_size)]
        idx = idx.to(device)
        batch = train.select(idx)
        sample = make_student_input(student, cfg, batch, ode_noise[idx], ode_x0[idx], it, g)
        generator_turn = it % cfg.critic_updates_per_generator_step == 0
        x0, loss_dmd, loss_reg = generator_losses(
            student, teacher, critic, cfg, batch, sample, g, with_grad=generator_turn
        )
        if generator_turn:
            loss = loss_dmd + cfg.regression_weight * loss_reg
            gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            gen_opt.step()
            for name, value in (("dmd", loss_dmd), ("regression", loss_reg)):
                sums[name] = sums.get(name, 0.0) + float(mean_over_ranks(value))
                counts[name] = counts.get(name, 0) + 1
        c_loss = critic_step_loss(critic, cfg, batch, x0.detach(), g)
        critic_opt.zero_grad(set_to_none=True)
        c_loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
        critic_opt.step()
        sums["critic"] = sums.get("critic", 0.0) + float(mean_over_ranks(c_loss))
        counts["critic"] = counts.get("critic", 0) + 1
        sums["self_rollouts"] = sums.get("self_rollouts", 0.0) + sample.self_rollouts
        counts["self_rollouts"] = counts.get("self_rollouts", 0) + 1

        done = it + 1
        record: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {k: sums[k] / counts[k] for k in sums}
            sums, counts = {}, {}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record.update(validation(student))
        if record:
            record["rollout_share"] = cfg.rollout_share(it)
            log.write(step=done, seconds=round(time.perf_counter() - t0, 2), **record)
            shown = ("dmd", "critic", "val_ode_mse")
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in shown})
        if done % cfg.save_every == 0 and done < cfg.steps and world_size == 1:
            save_state(done)
        if out_of_time(cfg.minutes_budget, t0):
            log.write(event="minutes_budget_reached", step=done)
            break
    path = save_model(student, cfg.preset, out / STUDENT_FILE)
    if world_size == 1:
        save_state(done)
    return path

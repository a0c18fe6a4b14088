"""Stage B: the bidirectional audio-conditioned I2V teacher (paper §2.1, §5.2 stages 1–2 at toy scale).

`workers.model.WanModel` (preset `tiny`) trained with flow matching in Wan's convention (workers/sampler.py):
x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, timestep t = 1000·σ, σ = sigmoid(n), n ~ N(mean, std) (the
logit-normal of SD3 / the paper's eq. 1–3, written for Wan's σ = 1 − t_paper). All latent frames are noised
(Wan I2V; the reference image arrives through y and CLIP). Attention is full (bidirectional) over the clip.

Conditioning dropout, for guidance: per clip, the audio is dropped with probability `audio_drop` (its face
mask is zeroed, so the audio branch adds nothing: the audio-unconditional model) and the text with
`text_drop` (the context becomes zeros, the DiT's own padding value).

Outputs in `out_dir`: `teacher.safetensors` (Wan layout, `workers.checkpoint.load_dit_checkpoint` loads
it), `teacher_state.pt` (resumable training state), `teacher_log.jsonl` (one JSON line per logged step:
step, loss, val_loss when evaluated, seconds), `inputs_*.pt` (the encoded clips).
Under `torchrun` (torch.distributed initialised) the model is sharded with FSDP2/HSDP (`training.fsdp`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from proto.model_config import get_model_preset
from training.batches import (
    ChunkAudioWanModel,
    ClipEncoder,
    ModelInputs,
    chunked_audio,
    encode_dataset,
    load_or_build_vae,
    token_weight,
    vae_identity,
)
from training.data import DataConfig, SyntheticTalkingDataset, dit_data_config
from training.devices import check_device
from training.fsdp import (
    FSDPConfig,
    build_mesh,
    full_state_dict,
    mean_over_ranks,
    rank_slice,
    shard_model,
    world,
)
from workers.checkpoint import save_dit_checkpoint
from workers.model import WanModel

TEACHER_FILE = "teacher.safetensors"


@dataclass(frozen=True)
class TeacherConfig:
    """Stage B settings; defaults fit ~20 min on 2 CPU cores at the data set's default size.

    data: a training.data.DataConfig (None = training.data.dit_data_config()).
    num_clips / val_clips: clips encoded once
    (indices 0.. and 1_000_000..). vae_checkpoint: stage A's output (None = seeded random VAE, tests).
    cache_dir: where the encoded clips are cached (None = out_dir).
    minutes_budget: stop early (and save) once training has run this long; None = run all steps.
    device: where the model, the data set and the VAE encoding live ("cpu", "cuda", "cuda:1"; one device:
    under torchrun use the CPU/gloo path). data_workers: processes that draw and condition the clips
    (0 = in this process). vae_batch: clips per VAE encoding call.
    """

    data: DataConfig | None = None
    vae_checkpoint: str | None = None
    cache_dir: str | None = None
    vae_preset: str = "tiny"
    preset: str = "tiny"
    chunk_latents: int = 3
    max_characters: int = 2
    num_clips: int = 256
    val_clips: int = 8
    steps: int = 10000
    minutes_budget: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    audio_drop: float = 0.1
    text_drop: float = 0.1
    mouth_weight: float = 8.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    save_every: int = 500
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    device: str = "cpu"
    data_workers: int = 0
    vae_batch: int = 16

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.data_workers < 0:
            raise ValueError(f"TeacherConfig.data_workers must be >= 0, got {self.data_workers}")
        positive = ("num_clips", "steps", "batch_size", "log_every", "eval_every", "save_every", "vae_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("audio_drop", "text_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TeacherConfig.{name} must be in [0, 1), got {getattr(self, name)}")


def predict_velocity(
    model: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    inputs: ModelInputs,
    *,
    keep_audio: torch.Tensor | None = None,
    keep_text: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """v = model(x_t) `[B, 16, L, h, w]` for noisy latents x_t `[B, 16, L, h, w]` at t `[B]` (0..1000).

    model: a `ChunkAudioWanModel` (possibly FSDP-sharded).
    keep_audio / keep_text `[B]` bool: False drops that conditioning for that clip. attn_mask: the
    `[L·S, L·S]` self-attention mask (None = bidirectional).
    """
    context = inputs.context
    if keep_text is not None:
        context = context * keep_text.to(context)[:, None, None]
    return model(
        x_t,
        t,
        context=context,
        clip_fea=inputs.clip_fea,
        y=inputs.y,
        chunked_audio=chunked_audio(inputs, keep_audio),
        attn_mask=attn_mask,
    )


def sample_logit_normal(
    n: int, mean: float, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """σ = sigmoid(N(mean, std)), `[n]` float32 in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(
    model: nn.Module,
    inputs: ModelInputs,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *,
    keep_audio: torch.Tensor | None = None,
    keep_text: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    mouth_weight: float = 0.0,
) -> torch.Tensor:
    """Mean squared error between v(x_σ) and ε − x0 (Wan's flow target); noise like latents, sigma `[B]`.

    mouth_weight: latent cells over a mouth count 1 + mouth_weight times (normalised so the mean weight is 1);
    the mouth is a few cells of each frame but carries the lip-sync signal.
    """
    x0 = inputs.latents
    sigma = sigma.to(x0.device)
    s = sigma.to(x0.dtype).view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = predict_velocity(
        model, x_t, sigma * 1000, inputs, keep_audio=keep_audio, keep_text=keep_text, attn_mask=attn_mask
    )
    err = (v.float() - (noise - x0).float()).pow(2)
    if mouth_weight == 0.0:
        return err.mean()
    weight = token_weight(inputs, mouth_weight)
    return (err * weight).mean() / weight.mean()


def lr_at(step: int, lr: float, warmup: int, total: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 10 % of `lr`; the decay follows the step count or, when a time
    budget is set, the fraction of it used (`time_fraction`), whichever is further along."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_fraction)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def time_used(minutes_budget: float | None, start: float) -> float:
    """Fraction of the time budget used since perf_counter() `start` (0 without a budget), averaged over
    ranks so every rank (every HSDP replica) applies the same learning rate."""
    if minutes_budget is None:
        return 0.0
    return float(mean_over_ranks(torch.tensor((time.perf_counter() - start) / (60 * minutes_budget))))


def out_of_time(minutes_budget: float | None, start: float) -> bool:
    """Whether a stage that started at perf_counter() `start` has used its budget (same on every rank)."""
    if minutes_budget is None:
        return False
    over = torch.tensor(float(time.perf_counter() - start > 60 * minutes_budget))
    return bool(mean_over_ranks(over) > 0)


class JsonlLog:
    """Appends one JSON object per line (the learning curves); only rank 0 writes."""

    def __init__(self, path: Path, *, append: bool) -> None:
        self.path = path
        self.enabled = world()[0] == 0
        if self.enabled and not append:
            path.write_text("")

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def load_clip_inputs(
    data: DataConfig | None,
    encoder: ClipEncoder,
    num_clips: int,
    val_clips: int,
    cache_dir: Path,
    seed: int,
    vae_checkpoint: str | None,
    workers: int = 0,
    vae_batch: int = 16,
) -> tuple[ModelInputs, ModelInputs]:
    """(training, validation) inputs of the synthetic data set (validation: indices from 1,000,000), encoded
    once and cached in `cache_dir` (stages B and C share the files when given the same directory); on the
    CPU whatever device the encoder's VAE is on."""
    if data is None:
        data = dit_data_config()
        if data.espeak_fraction == 0:
            print("note: espeak-ng is not installed; the DiT trains on the numpy voice only "
                  "(apt-get install espeak-ng for real speech)", file=sys.stderr)  # fmt: skip
    dataset = SyntheticTalkingDataset(data, seed)
    vae = vae_identity(vae_checkpoint, seed)  # its content: a copied run directory keeps its clips
    key = f"{data!r}|seed={seed}|vae={vae}|{encoder.model.name}|{encoder.featurizer_config!r}"
    # everything the inputs depend on but the VAE (a new VAE encodes the latents again, nothing else)
    conditioning = f"{data!r}|seed={seed}|{encoder.model.name}|{encoder.featurizer_config!r}"
    tag = "" if encoder.chunk_latents == 3 else f"_f{encoder.chunk_latents}"  # chunking crops differently
    train = encode_dataset(dataset, range(num_clips), encoder, cache_dir / f"inputs_train{tag}.pt", key,
                           workers=workers, vae_batch=vae_batch, conditioning_key=conditioning)  # fmt: skip
    val_indices = range(1_000_000, 1_000_000 + val_clips)
    val = encode_dataset(dataset, val_indices, encoder, cache_dir / f"inputs_val{tag}.pt", key,
                         workers=min(workers, val_clips), vae_batch=vae_batch,
                         conditioning_key=conditioning)  # fmt: skip
    return train, val


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by `torch.save`, on the CPU whatever device wrote it."""
    return torch.load(path, map_location="cpu", weights_only=False)


def prepare_for_world(model: WanModel, config: FSDPConfig) -> nn.Module:
    """Shard with FSDP2/HSDP when running under torchrun with several ranks; else the model itself."""
    if world()[1] == 1:
        return model
    return shard_model(model, build_mesh(config), config)


def save_model(model: nn.Module, preset: str, path: Path) -> Path:
    """Write the (possibly sharded) DiT in Wan's layout from rank 0; every rank must call it."""
    state = {k: v.detach().cpu() for k, v in full_state_dict(model).items()}
    if world()[0] != 0:
        return path
    with torch.device("meta"):
        plain = WanModel(get_model_preset(preset))
    plain.load_state_dict(state, assign=True)
    return save_dit_checkpoint(plain, path)


@torch.no_grad()
def validation_loss(model: nn.Module, val: ModelInputs, seed: int) -> float:
    """Flow-matching loss on the held-out clips at fixed noise and σ on a 0.1 … 0.9 grid (comparable across
    steps and runs)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(val.latents.shape, generator=g).to(val.latents.device)
    sigma = torch.linspace(0.1, 0.9, val.batch_size)
    return float(flow_matching_loss(model, val, noise, sigma))


def train_teacher(cfg: TeacherConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Train the teacher; returns the path of `teacher.safetensors` (Wan layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()  # the budget covers set-up (encoding, ODE pairs) too
    rank, world_size = world()
    torch.manual_seed(cfg.seed)
    device = check_device(cfg.device)
    vae = load_or_build_vae(cfg.vae_checkpoint, cfg.vae_preset, cfg.seed).to(device)
    model_cfg = get_model_preset(cfg.preset)
    encoder = ClipEncoder(
        model_cfg, vae, chunk_latents=cfg.chunk_latents, max_characters=cfg.max_characters, seed=0
    )
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else out
    train, val = load_clip_inputs(
        cfg.data, encoder, cfg.num_clips, cfg.val_clips, cache_dir, cfg.seed, cfg.vae_checkpoint,
        cfg.data_workers, cfg.vae_batch,
    )  # fmt: skip
    del encoder, vae
    train, val = train.to(device), val.to(device)

    model = ChunkAudioWanModel(model_cfg)
    state_path = out / "teacher_state.pt"
    state = load_state(state_path) if resume and state_path.is_file() else None
    if state is not None:
        model.load_state_dict(state["model"])
    model = prepare_for_world(model.to(device), cfg.fsdp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        if world_size == 1:
            opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    log = JsonlLog(out / "teacher_log.jsonl", append=state is not None)
    if state is None:
        log.write(event="config", **{k: str(v) for k, v in asdict(cfg).items()})

    done = start
    bar = tqdm(range(start, cfg.steps), desc="teacher", disable=rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(train.batch_size, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, *train.latents.shape[1:]), generator=g).to(device)
        sigma = sample_logit_normal(cfg.batch_size, cfg.logit_mean, cfg.logit_std, g).to(device)
        keep_audio = (torch.rand(cfg.batch_size, generator=g) >= cfg.audio_drop).to(device)
        keep_text = (torch.rand(cfg.batch_size, generator=g) >= cfg.text_drop).to(device)
        mine = rank_slice(cfg.batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, time_used(cfg.minutes_budget, t0))
        loss = flow_matching_loss(
            model,
            train.select(idx[mine].to(device)),
            noise[mine],
            sigma[mine],
            keep_audio=keep_audio[mine],
            keep_text=keep_text[mine],
            mouth_weight=cfg.mouth_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        done = step + 1
        record: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            record["loss"] = float(mean_over_ranks(loss))
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record["val_loss"] = validation_loss(model, val, cfg.seed + 1)
        if record:
            log.write(step=done, seconds=round(time.perf_counter() - t0, 2), **record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})
        if done % cfg.save_every == 0 and done < cfg.steps and world_size == 1:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done}, state_path)
        if out_of_time(cfg.minutes_budget, t0):
            log.write(event="minutes_budget_reached", step=done)
            break
    path = save_model(model, cfg.preset, out / TEACHER_FILE)
    if world_size == 1:
        final = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done}
        torch.save(final, state_path)
    return path

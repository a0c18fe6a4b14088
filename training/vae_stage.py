"""Stage A: train the Wan-VAE (``tiny`` preset) on synthetic talking-character frames.

Objective per batch of windows x [B, 3, T, H, W] in [-1, 1]:

    loss = weighted L1(x_hat, x) + L2(x_hat, x) + kl_weight * KL(q(z|x) || N(0, I) in normalised space)

- The encoder's head gives mu || logvar (Wan's layout, ``WanVAE.conv1``); ``WanVAE.encode`` keeps mu only,
  so training calls the submodules directly: z = mu + exp(logvar / 2) * eps, x_hat = decoder(conv2(z)).
- The KL is taken on the *normalised* posterior ((mu - latent_mean) / latent_std, the space the DiT works in,
  with the Wan constants the preset keeps), so a small KL pulls the latents the DiT sees towards unit scale
  instead of pulling raw mu towards 0, which after normalisation would be a constant offset.
- The L1 term weighs pixels inside the mouth boxes ``1 + mouth_weight``: the mouth is a few pixels of a 64x64
  frame but carries the lip-sync signal every later stage is judged on.
- ``mouth_motion_weight`` adds the mean L1 error of the frame-to-frame *differences* inside the mouth boxes
  (a window's consecutive frames). A latent frame covers 4 video frames, and a VAE trained without it keeps
  about the mouth averaged over them (the previous default's reconstructed real speech at lip-sync 0.49,
  a mouth held per latent frame scores 0.51, ground truth 0.87; ``training.lipsync_chain``), losing the
  syllables. The term alone did not change that; with mouth streams (`mouth_stream_every`) it did (0.70;
  the default's VAE). Off by default (training/README.md, *Stage A for lip-sync*).
- Training streams, as inference does (truncated back-propagation through time): a batch of B clips is
  encoded and decoded ``stream_windows`` windows in a row through one encoder and one decoder
  ``FeatureCache``, each window a training step, the caches detached in between. The causal convolutions
  of Wan's VAE see ~30 latent frames back (11 kernel-3 convolutions at the latent rate in the decoder
  alone), so a VAE trained only on fresh short windows never meets the cache state of a long stream and
  its reconstructions drift: one trained on fresh 13-frame windows fell from 24 dB on the second latent
  frame to 15.6 dB by the 15th, and every later stage inherited the drift.

- First images, then streams (``image_fraction`` of the stage), as Wan's VAE was trained (a 2-D image VAE
  inflated to 3-D): single frames of many more distinct characters per minute than 13-frame windows of a
  few, so colour and shape are learnt early; ``inflate_image_vae`` then zeroes the earlier temporal taps and
  makes the temporal resampling pass frames through, so the video VAE starts as the image VAE on every frame.
  Streams alone at lr 2e-3 (the recipe until then) plateaued at 18 dB with grey faces: the VAE kept the
  luminance but lost the colours.

Evaluation on held-out clips (indices from ``EVAL_INDEX_START``) runs the inference path, ``WanVAE.encode``
then ``WanVAE.decode`` (cached, chunk by chunk), and reports PSNR over whole frames and inside the mouth
boxes, normalised-latent statistics, and the lip-sync score of the reconstruction (does the VAE keep the
mouth motion?) next to that of the ground truth.

Outputs in ``out_dir``: ``vae.pth`` (Wan's layout: ``--vae-checkpoint`` loads it; its latents standardised
to per-channel mean 0 / std 1 on training clips, see ``standardise_latents``), ``vae_state.pt`` (resumable
training state, weights as trained), ``vae_log.jsonl`` (one JSON object per log / eval event).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from decoder.checkpoint import load_vae, save_vae_checkpoint
from decoder.feature_cache import FeatureCache
from decoder.vae import AttentionBlock, CausalConv3d, Resample, ResidualBlock, WanVAE
from proto.vae_config import get_vae_preset
from training.checkpointing import load_training_state, save_training_state
from training.data import Clip, DataConfig, SyntheticTalkingDataset
from training.devices import check_device
from training.lipsync import lipsync_score
from training.pools import as_arrays, as_tensors

VAE_FILE = "vae.pth"
STATE_FILE = "vae_state.pt"
LOG_FILE = "vae_log.jsonl"
EVAL_INDEX_START = 5_000_000
"""Held-out clips are data-set indices EVAL_INDEX_START.. (training uses step * batch_size + b)."""
IMAGE_INDEX_START = 10_000_000
"""The image phase's clips are data-set indices IMAGE_INDEX_START + step * image_batch + b."""


@dataclass(frozen=True)
class VAEStageConfig:
    """Stage A settings; the defaults fit ~10 minutes on 2 shared CPU cores.

    Attributes:
        data: the synthetic data set (its frame size is the VAE's training resolution).
        steps: optimizer steps at most; training also stops when `minutes_budget` is spent.
        minutes_budget: wall-clock budget in minutes including evaluations (None = steps only). The
            learning-rate schedule follows max(step / steps, elapsed / budget), so a budget-bound run still
            anneals.
        batch_size, clip_frames: streams per step and frames of a stream's first window (1 + 4k: 13 = four
            latent frames); its later windows have clip_frames - 1 frames (three latent frames).
        stream_windows: windows (training steps) per stream: a stream covers the first
            `stream_frames` = clip_frames + (stream_windows - 1) * (clip_frames - 1) frames of its clips
            (73 by default: 19 latent frames), with the caches carried from window to window (the
            module docstring says why). The data's clips must be at least that long.
        image_fraction: share of the stage (of `minutes_budget` when set, else of `steps`) spent first on
            single frames, as Wan's VAE was trained: a 2-D image VAE with the same weights, then inflated
            to 3-D (`inflate_image_vae`) and trained on streams. A frame costs about a twelfth of a stream
            window's 13 frames and the frames of a clip are nearly alike, so the image phase sees many more
            distinct characters per minute; 0 trains on streams from the start.
        image_batch, image_clip_frames: frames per image step (each from its own clip) and the length of
            the short clips they are drawn from (a random frame of each).
        crop: train on crop x crop squares of the frames (None = whole frames). The VAE is convolutional
            (its middle attention sees fewer tokens), so a 32 px crop costs a quarter of a 64 px frame and a
            step sees 4x as many different characters, which is what the held-out error is limited by.
        lr, lr_final_fraction, warmup_steps: Adam learning rate, linear warm-up, cosine decay to
            lr * lr_final_fraction. inflate_warmup_steps: a second warm-up where the streams begin.
        kl_weight: weight of the per-element mean KL (normalised latent space) against the per-pixel losses.
        mouth_weight: extra L1 weight inside mouth boxes (the mouth is ~1.5 % of a frame).
        mouth_motion_weight: weight of the mouth's frame-difference L1 (see the module docstring; 0 = off).
        espeak_fraction: when set, the share of speaking clips voiced by espeak-ng (overrides `data`'s; the
            command line cannot reach `data`'s fields).
        init_state: start from this stage-A training state (a `vae_state.pt` past the image phase: weights,
            Adam moments and RNGs) with the step count, schedule and clock at 0: a second run on an
            existing VAE (--resume instead continues its schedule).
        mouth_stream_every, mouth_crop: every `mouth_stream_every`-th training stream (0 = none) is cut to
            mouth_crop x mouth_crop squares always centred on the speaker's mouth, so that the mouth is a
            large part of what the step reconstructs (the other streams keep `crop`).
        init_logvar: initial bias of the posterior's log-variance channels. Starting far below 0 makes the
            KL's first gradients push every variance up to the prior's at once (posterior collapse: held-out
            latents with std 0.09 and no reconstruction after 200 steps); 0 does not.
        eval_every, eval_clips: held-out evaluation period (steps) and size (full clips).
        save_every, log_every: training-state and log periods (steps). A save at a multiple of
            stream_windows resumes bit-exactly; elsewhere the resumed run refills the stream's caches with
            its current weights.
        device: where the VAE trains ("cpu", "cuda", ...); the clips are drawn on the CPU.
        data_workers: processes that draw the next streams ahead of training (0 = draw in this process,
            between steps). The streams are the same either way (a pure function of seed and stream).
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(num_frames=73))
    vae_preset: str = "tiny"
    steps: int = 8000
    minutes_budget: float | None = 25.0
    batch_size: int = 6
    clip_frames: int = 13
    stream_windows: int = 6
    image_fraction: float = 0.4
    image_batch: int = 16
    image_clip_frames: int = 9
    crop: int | None = 32
    lr: float = 5e-4
    lr_final_fraction: float = 0.1
    warmup_steps: int = 30
    inflate_warmup_steps: int = 100
    kl_weight: float = 1e-4
    mouth_weight: float = 10.0
    mouth_motion_weight: float = 0.0
    mouth_stream_every: int = 0
    mouth_crop: int = 16
    espeak_fraction: float | None = None
    init_state: str | None = None
    init_logvar: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_clips: int = 4
    save_every: int = 96
    log_every: int = 10
    device: str = "cpu"
    data_workers: int = 0

    def __post_init__(self) -> None:
        if self.espeak_fraction is not None:
            voiced = dataclasses.replace(self.data, espeak_fraction=self.espeak_fraction)
            object.__setattr__(self, "data", voiced)  # a frozen dataclass
        check_device(self.device)
        if self.data_workers < 0:
            raise ValueError(f"VAEStageConfig.data_workers must be >= 0, got {self.data_workers}")
        for name in (
            "steps", "batch_size", "stream_windows", "eval_every", "eval_clips", "save_every", "log_every"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEStageConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_frames < 5 or (self.clip_frames - 1) % 4:
            raise ValueError(f"VAEStageConfig.clip_frames={self.clip_frames} must be 1 + 4k with k >= 1")
        if self.stream_frames > self.data.num_frames:
            raise ValueError(
                f"VAEStageConfig: a stream of {self.stream_windows} windows covers {self.stream_frames} "
                f"frames but the data's clips have num_frames={self.data.num_frames}; make them longer or "
                "use fewer stream_windows"
            )
        if self.minutes_budget is not None and self.minutes_budget <= 0:
            raise ValueError(
                f"VAEStageConfig.minutes_budget must be positive or None, got {self.minutes_budget}"
            )
        if not 0 <= self.image_fraction < 1:
            raise ValueError(f"VAEStageConfig.image_fraction must be in [0, 1), got {self.image_fraction}")
        if self.image_batch < 1 or self.image_clip_frames < 1 or (self.image_clip_frames - 1) % 4:
            raise ValueError("VAEStageConfig: image_batch must be >= 1 and image_clip_frames 1 + 4k")
        if self.mouth_weight < 0 or self.mouth_motion_weight < 0:
            raise ValueError("VAEStageConfig: mouth_weight and mouth_motion_weight must be >= 0")
        if self.mouth_stream_every < 0 or self.mouth_crop < 8 or self.mouth_crop % 8:
            raise ValueError("VAEStageConfig: mouth_stream_every must be >= 0 and mouth_crop a multiple of 8")
        if self.lr <= 0 or not 0 < self.lr_final_fraction <= 1:
            raise ValueError("VAEStageConfig: lr must be > 0 and lr_final_fraction in (0, 1]")
        get_vae_preset(self.vae_preset)

    @property
    def stream_frames(self) -> int:
        """Frames of a clip one stream covers (its first window, then stream_windows - 1 continuations)."""
        return self.clip_frames + (self.stream_windows - 1) * (self.clip_frames - 1)

    def window(self, step: int) -> slice:
        """The frames of the stream window that `step` trains on (streams start at a clip's frame 0)."""
        j = step % self.stream_windows
        if j == 0:
            return slice(0, self.clip_frames)
        start = self.clip_frames + (j - 1) * (self.clip_frames - 1)
        return slice(start, start + self.clip_frames - 1)


def video_to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_video(x: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] (clamped) -> uint8 [T, H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def mouth_mask(clip: Clip, frames: slice, height: int, width: int) -> np.ndarray:
    """float32 [T', H, W]: 1 inside any character's mouth box (grown by 1 px) in those frames, else 0."""
    boxes = clip.mouth_boxes_px[:, frames]  # [C, T', 4]
    x = np.arange(width, dtype=np.float32) + 0.5
    y = np.arange(height, dtype=np.float32) + 0.5
    inside_x = (x >= boxes[..., 0:1] - 1) & (x <= boxes[..., 2:3] + 1)  # [C, T', W]
    inside_y = (y >= boxes[..., 1:2] - 1) & (y <= boxes[..., 3:4] + 1)  # [C, T', H]
    return (inside_y[..., :, None] & inside_x[..., None, :]).any(axis=0).astype(np.float32)


def sample_stream(
    dataset: SyntheticTalkingDataset, cfg: VAEStageConfig, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips of training stream `stream` (steps stream * stream_windows ...), a pure function of
    (seed, stream).

    With `cfg.crop`, each clip is a crop x crop square of the frames at a multiple of 8 px (the latent
    grid), centred on the speaker's mouth (at frame 0) half of the time and anywhere otherwise; a mouth
    stream (`cfg.mouth_stream_every`) is cut to `cfg.mouth_crop` squares on the mouth (a silent clip's:
    anywhere).

    Returns:
        video [B, 3, stream_frames, h, w] in [-1, 1]; mouth [B, 1, stream_frames, h, w] in {0, 1}.
    """
    rng = np.random.default_rng([cfg.seed, 0xA, stream])
    height, width = cfg.data.height, cfg.data.width
    frames = slice(0, cfg.stream_frames)
    crop, on_mouth = cfg.crop, 0.5
    if cfg.mouth_stream_every and stream % cfg.mouth_stream_every == cfg.mouth_stream_every - 1:
        crop, on_mouth = cfg.mouth_crop, 1.0
    videos, mouths = [], []
    for b in range(cfg.batch_size):
        clip = dataset.clip(stream * cfg.batch_size + b)
        video = video_to_tensor(clip.video[frames])
        mouth = torch.from_numpy(mouth_mask(clip, frames, height, width))[None]
        if crop is not None and crop < min(height, width):
            top, left = _crop_origin(rng, clip, 0, crop, height, width, on_mouth)
            video = video[:, :, top : top + crop, left : left + crop]
            mouth = mouth[:, :, top : top + crop, left : left + crop]
        videos.append(video)
        mouths.append(mouth)
    return torch.stack(videos), torch.stack(mouths)


def sample_batch(
    dataset: SyntheticTalkingDataset, cfg: VAEStageConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training window of `step`: `cfg.window(step)` of stream step // stream_windows.

    Returns:
        video [B, 3, T, h, w] in [-1, 1]; mouth [B, 1, T, h, w]; T = clip_frames on a stream's first
        window, clip_frames - 1 later.
    """
    video, mouth = sample_stream(dataset, cfg, step // cfg.stream_windows)
    window = cfg.window(step)
    return video[:, :, window], mouth[:, :, window]


def image_dataset(dataset: SyntheticTalkingDataset, cfg: VAEStageConfig) -> SyntheticTalkingDataset:
    """The image phase's data: the same characters in short clips (`cfg.image_clip_frames`)."""
    return SyntheticTalkingDataset(replace(dataset.cfg, num_frames=cfg.image_clip_frames), seed=dataset.seed)


def sample_images(
    images: SyntheticTalkingDataset, cfg: VAEStageConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-phase batch of `step`, a pure function of (seed, step): one random frame of each of
    `cfg.image_batch` clips, cropped as `sample_stream` crops.

    Returns:
        video [B, 3, 1, h, w] in [-1, 1]; mouth [B, 1, 1, h, w] in {0, 1}.
    """
    rng = np.random.default_rng([cfg.seed, 0xB, step])
    height, width = images.cfg.height, images.cfg.width
    videos, mouths = [], []
    for b in range(cfg.image_batch):
        clip = images.clip(IMAGE_INDEX_START + step * cfg.image_batch + b)
        frame = int(rng.integers(0, images.cfg.num_frames))
        video = video_to_tensor(clip.video[frame : frame + 1])
        mouth = torch.from_numpy(mouth_mask(clip, slice(frame, frame + 1), height, width))[None]
        if cfg.crop is not None and cfg.crop < min(height, width):
            top, left = _crop_origin(rng, clip, frame, cfg.crop, height, width)
            video = video[:, :, top : top + cfg.crop, left : left + cfg.crop]
            mouth = mouth[:, :, top : top + cfg.crop, left : left + cfg.crop]
        videos.append(video)
        mouths.append(mouth)
    return torch.stack(videos), torch.stack(mouths)


@torch.no_grad()
def inflate_image_vae(vae: WanVAE) -> None:
    """Turn a VAE trained on single frames into a video VAE that starts as that image VAE, in place.

    On one frame every causal convolution sees zeros in front of it, so image training only shapes the
    last temporal tap of each kernel and never runs the temporal resampling convolutions. Inflation zeroes
    the earlier taps (every frame then goes through the image network alone), makes each encoder
    downsample3d time_conv pass on the newest frame of its window, and each decoder upsample3d time_conv
    copy its frame into both output frames. A still video then reconstructs, frame by frame, exactly as the
    image VAE reconstructs that frame (tested); the stream phase learns the motion from there.
    """
    time_convs = set()
    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv
            time_convs.add(conv)
            conv.weight.zero_()
            conv.bias.zero_()
            eye = torch.eye(conv.in_channels, dtype=conv.weight.dtype, device=conv.weight.device)
            for half in range(conv.out_channels // conv.in_channels):
                conv.weight[half * conv.in_channels : (half + 1) * conv.in_channels, :, -1, 0, 0] = eye
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module not in time_convs and module.kernel_size[0] > 1:
            module.weight[:, :, :-1] = 0


class StreamSource:
    """The training streams (`sample_stream`), drawn on demand or, with `cfg.data_workers` > 0, up to twice
    that many streams ahead in spawned processes, so that drawing overlaps training."""

    def __init__(self, dataset: SyntheticTalkingDataset, cfg: VAEStageConfig) -> None:
        self.draw = functools.partial(sample_stream, dataset, cfg)
        self.workers = cfg.data_workers
        self.pool: Any = None
        self.pending: dict[int, Any] = {}
        self.draw_arrays = functools.partial(_draw_arrays, self.draw)
        if self.workers > 0:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)

    def get(self, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is None:
            return self.draw(stream)
        for ahead in range(stream, stream + 2 * self.workers):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.apply_async(self.draw_arrays, (ahead,))
        for old in [k for k in self.pending if k < stream]:  # a resumed run skips
            del self.pending[old]
        return as_tensors(self.pending.pop(stream).get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _draw_arrays(draw: Any, stream: int) -> tuple[np.ndarray, ...]:
    """`draw(stream)` in a pool worker, as arrays for the pipe (`training.pools`)."""
    return as_arrays(draw(stream))


class StreamCaches:
    """The encoder's and the decoder's FeatureCache of one training stream (truncated BPTT)."""

    def __init__(self) -> None:
        self.encoder = FeatureCache()
        self.decoder = FeatureCache()

    def detach(self) -> None:
        """Cut the graph between windows: later windows read the cached features as constants."""
        for cache in (self.encoder, self.decoder):
            cache.buffers = [b.detach() for b in cache.buffers]


def _crop_origin(
    rng: np.random.Generator,
    clip: Clip,
    frame: int,
    crop: int,
    height: int,
    width: int,
    on_mouth: float = 0.5,
) -> tuple[int, int]:
    """Top-left corner (multiples of 8) of a crop: around a mouth with probability `on_mouth`, else
    uniform."""
    if clip.speaker >= 0 and rng.random() < on_mouth:
        x0, y0, x1, y1 = clip.mouth_boxes_px[clip.speaker, frame]
        cy, cx = (y0 + y1) / 2 - crop / 2, (x0 + x1) / 2 - crop / 2
        top = int(np.clip(round(cy / 8) * 8, 0, height - crop))
        left = int(np.clip(round(cx / 8) * 8, 0, width - crop))
        return top, left
    top = int(rng.integers(0, (height - crop) // 8 + 1)) * 8
    return top, int(rng.integers(0, (width - crop) // 8 + 1)) * 8


def encode_posterior(
    vae: WanVAE, video: torch.Tensor, cache: FeatureCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """video [B, 3, T, H, W] -> raw (mu, logvar), each [B, z, T', H/8, W/8]: one causal pass (T = 1 + 4k,
    T' = 1 + k), or one step of a stream through `cache` (WanVAE.encode_step's frame counts)."""
    if cache is None:
        features = vae.encoder(video)
    else:
        cache.begin_step()
        features = vae.encoder(video, cache)
        cache.end_step()
    mu, logvar = vae.conv1(features).chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def decode_latents(vae: WanVAE, z: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
    """Raw latents [B, z, T', h, w] -> video (one causal pass, or one stream step through `cache`)."""
    x = vae.conv2(z)
    if cache is None:
        return vae.decoder(x)
    cache.begin_step()
    out = vae.decoder(x, cache)
    cache.end_step()
    return out


def normalised_kl(vae: WanVAE, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean per-element KL(N(mu_n, var_n) || N(0, 1)) of the posterior in normalised latent space.

    mu, logvar: raw posterior [B, z, T, h, w]; mu_n = (mu - latent_mean) / latent_std and
    var_n = exp(logvar) / latent_std^2 (the normalisation `WanVAE.encode` applies to mu).
    """
    mean, std = vae._stats(mu)
    mu_n = (mu - mean) / std
    logvar_n = logvar - 2 * torch.log(std)
    return 0.5 * (mu_n.square() + logvar_n.exp() - 1.0 - logvar_n).mean()


def vae_loss(
    vae: WanVAE,
    video: torch.Tensor,
    mouth: torch.Tensor,
    cfg: VAEStageConfig,
    caches: StreamCaches | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage-A objective on a batch (see the module docstring); returns (loss, its parts). With
    `caches`, the batch is the next window of a stream."""
    mu, logvar = encode_posterior(vae, video, None if caches is None else caches.encoder)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = decode_latents(vae, z, None if caches is None else caches.decoder)
    weight = 1.0 + cfg.mouth_weight * mouth
    l1 = ((recon - video).abs() * weight).mean() / weight.mean()
    l2 = F.mse_loss(recon, video)
    kl = normalised_kl(vae, mu, logvar)
    loss = l1 + l2 + cfg.kl_weight * kl
    parts = {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach())}
    if cfg.mouth_motion_weight > 0 and video.shape[2] > 1:
        motion = mouth_motion_l1(recon, video, mouth)
        loss = loss + cfg.mouth_motion_weight * motion
        parts["motion"] = float(motion.detach())
    return loss, parts


def mouth_motion_l1(recon: torch.Tensor, video: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
    """Mean |(x_hat[t] - x_hat[t-1]) - (x[t] - x[t-1])| over the pixels inside a mouth box in frame t or
    t-1 (videos [B, 3, T, H, W], mouth [B, 1, T, H, W] in {0, 1}); 0 when no mouth is in view."""
    error = ((recon[:, :, 1:] - recon[:, :, :-1]) - (video[:, :, 1:] - video[:, :, :-1])).abs()
    mask = torch.maximum(mouth[:, :, 1:], mouth[:, :, :-1])
    return (error * mask).sum() / (mask.sum() * error.shape[1]).clamp(min=1.0)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of two videos in [-1, 1] measured on the [0, 1] scale (optionally inside a 0/1 mask)."""
    err = ((a - b) / 2).square()
    if mask is not None:
        err = (err * mask).sum() / (mask.sum() * err.shape[0]).clamp(min=1)
    mse = float(err.mean()) if mask is None else float(err)
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_vae(vae: WanVAE, dataset: SyntheticTalkingDataset, num_clips: int) -> dict[str, Any]:
    """Held-out reconstruction through the inference path (encode, then cached decode).

    Returns psnr / psnr_mouth (dB, mean over clips), latent_mean / latent_std (of normalised latents over
    all elements), and lipsync_recon / lipsync_truth (mean offset-0 correlation over speaking clips, None if
    none speaks).
    """
    was_training = vae.training
    vae.eval()
    cfg = dataset.cfg
    psnrs, mouth_psnrs, latents, sync_recon, sync_truth = [], [], [], [], []
    device = vae.conv1.weight.device
    for i in range(num_clips):
        clip = dataset.clip(EVAL_INDEX_START + i)
        x = video_to_tensor(clip.video)
        z = vae.encode(x[None].to(device))
        y = vae.decode(z)[0].clamp(-1, 1).cpu()
        z = z.cpu()
        latents.append(z.flatten())
        psnrs.append(psnr(y, x))
        mask = torch.from_numpy(mouth_mask(clip, slice(None), cfg.height, cfg.width))[None]
        mouth_psnrs.append(psnr(y, x, mask))
        if clip.speaker >= 0:
            sync_recon.append(lipsync_score(tensor_to_video(y), clip)["correlation"])
            sync_truth.append(lipsync_score(clip.video, clip)["correlation"])
    vae.train(was_training)
    z_all = torch.cat(latents)
    return {
        "psnr": float(np.mean(psnrs)),
        "psnr_mouth": float(np.mean(mouth_psnrs)),
        "latent_mean": float(z_all.mean()),
        "latent_std": float(z_all.std()),
        "lipsync_recon": float(np.mean(sync_recon)) if sync_recon else None,
        "lipsync_truth": float(np.mean(sync_truth)) if sync_truth else None,
    }


def learning_rate(cfg: VAEStageConfig, step: int, elapsed_s: float, stream_start: int | None = None) -> float:
    """Linear warm-up, then cosine from lr to lr * lr_final_fraction over max(step, time) progress; a second
    warm-up of `inflate_warmup_steps` from `stream_start`. The kernels' new temporal taps have no Adam
    history, and a run without it fell from 21.3 to 17.4 dB after the switch; with it the fall is still
    there (23.4 to 18.7 dB within 52 steps, then a recovery past the image phase), so it is a precaution,
    not the cure.
    """
    progress = step / cfg.steps
    if cfg.minutes_budget is not None:
        progress = max(progress, elapsed_s / (60 * cfg.minutes_budget))
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if stream_start is not None and stream_start > 0 and cfg.inflate_warmup_steps > 0:
        warm *= min(1.0, (step - stream_start + 1) / cfg.inflate_warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction) * cosine)


def build_trainable_vae(cfg: VAEStageConfig) -> WanVAE:
    """A freshly initialised VAE of the preset, in train mode with gradients (init seeded by cfg.seed).

    Training init on top of PyTorch's defaults: the last convolution of every residual branch and the
    attention output projections start at zero (each block starts as its shortcut, which trains a deep
    narrow network markedly faster), and the posterior's log-variance starts at `init_logvar` so early
    samples are not drowned in unit noise before the decoder has learnt anything.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = WanVAE(get_vae_preset(cfg.vae_preset))
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResidualBlock):
                last = module.residual[6]
                last.weight.zero_()
                last.bias.zero_()
            elif isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
        vae.conv1.bias[vae.cfg.z_dim :].fill_(cfg.init_logvar)
    return vae.train()


def _train_step(
    vae: WanVAE,
    opt: torch.optim.Optimizer,
    video: torch.Tensor,
    mouth: torch.Tensor,
    cfg: VAEStageConfig,
    caches: StreamCaches | None,
) -> dict[str, float]:
    loss, parts = vae_loss(vae, video, mouth, cfg, caches)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if caches is not None:
        caches.detach()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
    opt.step()
    return {"loss": float(loss.detach()), **parts}


@torch.no_grad()
def _replay_stream(
    vae: WanVAE,
    cfg: VAEStageConfig,
    step: int,
    stream: tuple[torch.Tensor, torch.Tensor],
    caches: StreamCaches,
) -> None:
    """Fill fresh caches with the windows of `step`'s stream before `step` (a run resumed mid-stream;
    saves at multiples of stream_windows resume bit-exactly without this)."""
    first = step - step % cfg.stream_windows
    for earlier in range(first, step):
        video = stream[0][:, :, cfg.window(earlier)]
        mu, _ = encode_posterior(vae, video, caches.encoder)
        decode_latents(vae, mu, caches.decoder)


@torch.no_grad()
def latent_statistics(vae: WanVAE, videos: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std `[z]` of the normalised latents (`WanVAE.encode`) of videos
    [N, 3, T, H, W]."""
    z = torch.cat([vae.encode(videos[i : i + batch]) for i in range(0, len(videos), batch)])
    z = z.transpose(0, 1).flatten(1).double()
    return z.mean(dim=1).float(), z.std(dim=1).float()


@torch.no_grad()
def standardise_latents(vae: WanVAE, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel affine map into the 1x1 convolutions around the latent, in place, so that
    `vae.encode` gives (z - mean) / std where it gave z, and `vae.decode` of those gives what `decode(z)`
    gave.

    The DiT learns flow matching against unit Gaussian noise and assumes unit-scale latents; Wan's
    normalisation constants (kept by every preset) fit Wan's VAE, not one trained from scratch, whose
    normalised latents came out with std 3.4. Folding the correction into `conv1` (the posterior head: mu
    rows scaled and shifted, log-variance shifted by -2 log std) and `conv2` (the decoder's input) keeps
    Wan's layout and constants: the checkpoint loads anywhere a Wan VAE does.
    """
    big_m, big_s = vae._stats(mean)
    big_m, big_s = big_m.flatten(), big_s.flatten()
    zdim = vae.cfg.z_dim
    # encoder head: mu' = (mu - M - S*mean) / std + M
    w1, b1 = vae.conv1.weight, vae.conv1.bias
    w1[:zdim] /= std.view(-1, 1, 1, 1, 1)
    b1[:zdim] = (b1[:zdim] - big_m - big_s * mean) / std + big_m
    b1[zdim:] -= 2 * torch.log(std)
    # decoder input: conv2'(mu') = conv2(M + S*mean + std * (mu' - M))
    w2, b2 = vae.conv2.weight, vae.conv2.bias
    offset = big_m + big_s * mean - std * big_m
    b2 += w2.flatten(1) @ offset
    w2 *= std.view(1, -1, 1, 1, 1)


def standardised_copy(vae: WanVAE, dataset: SyntheticTalkingDataset, clips: int = 8) -> tuple[WanVAE, dict]:
    """A copy of `vae` whose latents on training clips (indices from 2,000,000) have per-channel mean 0 and
    std 1, and the statistics before and after."""
    videos = torch.stack([video_to_tensor(dataset.clip(2_000_000 + i).video) for i in range(clips)])
    out = copy.deepcopy(vae).eval()
    videos = videos.to(out.conv1.weight.device)
    mean, std = latent_statistics(out, videos)
    standardise_latents(out, mean, std)
    after_mean, after_std = latent_statistics(out, videos)
    return out, {
        "latent_channel_mean_before": [round(float(v), 4) for v in mean],
        "latent_channel_std_before": [round(float(v), 4) for v in std],
        "latent_channel_std_after": [round(float(v), 4) for v in after_std],
        "latent_channel_mean_after": [round(float(v), 4) for v in after_mean],
    }


class _Log:
    """Append-only JSON-lines log."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        if not append:
            path.write_text("")

    def write(self, **record: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_vae(cfg: VAEStageConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Run stage A; returns the path of the trained VAE (`out_dir/vae.pth`, Wan's layout).

    resume: continue from `out_dir/vae_state.pt` (model, optimizer, step, RNGs, elapsed time, eval history)
    when it exists; without it a run starts over.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = SyntheticTalkingDataset(cfg.data, seed=cfg.seed)
    device = check_device(cfg.device)
    vae = build_trainable_vae(cfg).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    state_path = out / STATE_FILE
    step, elapsed_before, history = 0, 0.0, []
    stream_start: int | None = None  # the step the stream phase began at (None: still on images)
    resumed = resume and state_path.is_file()
    if resumed:
        step, extra = load_training_state(state_path, model=vae, optimizer=opt)
        elapsed_before = float(extra.get("elapsed_s", 0.0))
        history = list(extra.get("evals", []))
        stream_start = extra.get("stream_start", 0)  # states from before the image phase: streams only
    elif cfg.init_state is not None:  # another run's weights, optimizer and RNGs; step and clock from 0
        _, extra = load_training_state(cfg.init_state, model=vae, optimizer=opt)
        if extra.get("stream_start", 0) is None:
            raise ValueError(f"init_state {cfg.init_state} is in the image phase; start from a later state")
        stream_start = 0
    else:
        torch.manual_seed(cfg.seed)
    log = _Log(out / LOG_FILE, append=resumed)
    if not resumed:
        log.write(event="config", **{k: str(v) for k, v in asdict(cfg).items()})
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def run_eval() -> dict[str, Any]:
        model = vae
        if stream_start is None:  # the video VAE the image phase would become now
            model = copy.deepcopy(vae)
            inflate_image_vae(model)
        scores = evaluate_vae(model, dataset, cfg.eval_clips)
        metrics = {"step": step, "seconds": round(elapsed(), 1), **scores}
        metrics["phase"] = "image" if stream_start is None else "stream"
        history.append(metrics)
        log.write(event="eval", **metrics)
        return metrics

    def save_state() -> None:
        save_training_state(
            state_path,
            model=vae,
            optimizer=opt,
            step=step,
            extra={"elapsed_s": elapsed(), "evals": history, "stream_start": stream_start},
        )

    def image_phase_over() -> bool:
        if budget_s is not None:  # a budget-bound run splits its time (steps only cap the whole run)
            return elapsed() >= cfg.image_fraction * budget_s
        return step >= cfg.image_fraction * cfg.steps

    if not history:
        run_eval()
    budget_s = None if cfg.minutes_budget is None else 60 * cfg.minutes_budget
    bar = tqdm(total=cfg.steps, initial=step, desc="stage A (vae)", unit="step", dynamic_ncols=True)
    bar.set_postfix(psnr=f"{history[-1]['psnr']:.2f}")
    caches: StreamCaches | None = None
    stream: tuple[torch.Tensor, torch.Tensor] | None = None
    source = StreamSource(dataset, cfg)
    images = image_dataset(dataset, cfg)

    def switch_to_streams() -> None:
        nonlocal stream_start
        inflate_image_vae(vae)
        stream_start = step
        log.write(event="inflate", step=step, seconds=round(elapsed(), 1))

    while step < cfg.steps and (budget_s is None or elapsed() < budget_s):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, elapsed(), stream_start)
        if stream_start is None and image_phase_over():
            switch_to_streams()
            bar.write(f"stage A: {step} image steps in {elapsed() / 60:.1f} min; inflated, now on streams")
        if stream_start is None:
            video, mouth = sample_images(images, cfg, step)
            parts = _train_step(vae, opt, video.to(device), mouth.to(device), cfg, None)
        else:
            s = step - stream_start  # steps into the stream phase
            if s % cfg.stream_windows == 0 or stream is None:
                video, mouth = source.get(s // cfg.stream_windows)
                stream = video.to(device), mouth.to(device)
                caches = StreamCaches()
                if s % cfg.stream_windows:
                    _replay_stream(vae, cfg, s, stream, caches)
            window = cfg.window(s)
            parts = _train_step(vae, opt, stream[0][:, :, window], stream[1][:, :, window], cfg, caches)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            lr = opt.param_groups[0]["lr"]
            log.write(event="train", step=step, seconds=round(elapsed(), 1), lr=lr, **parts)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", psnr=f"{history[-1]['psnr']:.2f}")
        if step % cfg.eval_every == 0:
            run_eval()
        if step % cfg.save_every == 0:
            save_state()
    bar.close()
    source.close()
    if stream_start is None:  # the run ended inside the image phase: ship the inflated VAE
        switch_to_streams()
    if history[-1]["step"] != step or history[-1].get("phase") != "stream":
        run_eval()
    save_state()
    path = out / VAE_FILE
    vae.eval()
    exported, stats = standardised_copy(vae, dataset)
    log.write(event="standardise", **stats)
    save_vae_checkpoint(exported, path)
    final = history[-1]
    print(
        f"stage A: {step} steps in {elapsed() / 60:.1f} min; held-out PSNR {final['psnr']:.2f} dB "
        f"(mouth {final['psnr_mouth']:.2f} dB); wrote {path}"
    )
    return path


def compare_vaes(
    checkpoints: Sequence[str | Path],
    num_clips: int,
    still: Path | None = None,
    preset: str = "tiny",
    espeak: bool = False,
) -> list[dict[str, Any]]:
    """`evaluate_vae` of each stage-A checkpoint on the same held-out clips (73 frames, the inference
    path); `still`: a PNG of frames 0, 24, 48, 72 of 4 clips, ground truth on top, a row per checkpoint;
    `espeak`: every speaking clip voiced by espeak-ng (real speech) instead of the numpy voice."""
    dataset = SyntheticTalkingDataset(DataConfig(num_frames=73, espeak_fraction=float(espeak)), seed=0)
    vaes = [load_vae(path, get_vae_preset(preset)) for path in checkpoints]
    rows = []
    for path, vae in zip(checkpoints, vaes, strict=True):
        print(f"evaluating {path} on {num_clips} held-out clips...", file=sys.stderr, flush=True)
        rows.append({"checkpoint": str(path), **evaluate_vae(vae, dataset, num_clips)})
    if still is not None:
        from training.evaluate import save_still  # training.evaluate imports this module

        videos = [dataset.clip(EVAL_INDEX_START + i).video for i in range(4)]
        tensors = [video_to_tensor(v)[None] for v in videos]
        strips = [np.concatenate(videos, axis=2)]  # the 4 clips side by side, one strip per row
        with torch.no_grad():
            for vae in vaes:
                recon = [tensor_to_video(vae.decode(vae.encode(t))[0]) for t in tensors]
                strips.append(np.concatenate(recon, axis=2))
        save_still(still, *strips, count=4, scale=2)  # frames 0, 24, 48, 72
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.vae_stage",
        description="Compare stage-A VAE checkpoints on held-out clips (PSNR, mouth PSNR, lip-sync of the "
        "reconstruction) through the inference path.",
    )
    parser.add_argument("checkpoints", nargs="+", help="vae.pth files (stage A's output or a bundle's)")
    parser.add_argument("--clips", type=int, default=8, help="held-out 73-frame clips (default 8)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (default: stdout)")
    parser.add_argument("--still", type=Path, help="PNG: ground truth on top, one row per checkpoint")
    parser.add_argument(
        "--espeak", action="store_true", help="clips voiced by espeak-ng (real speech; needs espeak-ng)"
    )
    args = parser.parse_args(argv)
    for path in args.checkpoints:
        if not Path(path).is_file():
            print(f"error: no VAE checkpoint at {path}", file=sys.stderr)
            return 2
    try:
        rows = compare_vaes(args.checkpoints, args.clips, args.still, espeak=args.espeak)
    except ValueError as exc:  # not a tiny Wan-VAE checkpoint, or --espeak without espeak-ng (DataConfig)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from benchmarks.provenance import provenance

    text = json.dumps({"provenance": provenance("training.vae_stage", argv), "vaes": rows}, indent=2)
    for row in rows:
        print(f"{row['checkpoint']}: PSNR {row['psnr']:.2f} dB, mouth {row['psnr_mouth']:.2f} dB, "
              f"lip-sync of the reconstruction {row['lipsync_recon']:.3f}", file=sys.stderr)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

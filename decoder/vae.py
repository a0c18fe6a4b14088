"""The Wan 2.1 causal video VAE: modules and state-dict key names exactly as in Wan's `wan/modules/vae.py`.

Tensors are laid out [B, C, T, H, W]. Pixels are in [-1, 1]; latents are normalised per channel
(z = (mu - mean) / std), the space the score model works in. With a `FeatureCache` the encoder and decoder
run piece by piece over a video and give the result of one causal run over all of it; without one, the
whole input is one piece from a fresh stream.

Frame bookkeeping (Wan's convention): latent 0 stands for video frame 0 alone and every later latent for
4 frames, so T latents <-> 1 + 4(T-1) frames. The decoder's temporal up-sampling passes the first latent
through without its time convolution (Wan's 'Rep' cache sentinel), which is why latent 0 decodes to 1 frame.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from decoder.feature_cache import FeatureCache
from proto.vae_config import VAEConfig


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2*pt frames in front (zeros, or the cached frames), none behind.

    Height and width are padded symmetrically by the convolution itself. On CPU in float32 the convolution
    runs as one Conv2d over stacked time windows (``_conv_as_2d``): PyTorch has no fast CPU Conv3d kernel
    (it falls back to ``slow_conv3d_forward``, im2col + GEMM in one thread), while mkldnn's Conv2d with the
    same FLOPs is several times faster. GPUs keep cuDNN's Conv3d. The weights stay Conv3d-shaped.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """x [B, Cin, T, H, W] -> [B, Cout, T', H', W']."""
        if self.time_pad:
            if cache is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
            else:
                buffer = cache.slot(x, self.time_pad)
                x = torch.cat([buffer.to(x.dtype), x], dim=2)
                cache.store(buffer, x)
        if self._uses_conv2d(x):
            return self._conv_as_2d(x)
        return super().forward(x)

    def _uses_conv2d(self, x: torch.Tensor) -> bool:
        """The CPU float32 fast path applies (plain zero-padded convolution, not under autocast)."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and self.groups == 1
            and self.dilation == (1, 1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
        )

    def _conv_as_2d(self, x: torch.Tensor) -> torch.Tensor:
        """The Conv3d of x [B, Cin, T, H, W] (already time-padded) as one Conv2d -> [B, Cout, T', H', W'].

        Output frame j sees input frames [j*st, j*st + kt); stacking those kt frames on the channel axis,
        channel-major ([Cin, kt], the order of the weight's [Cin, kt] axes), turns the Conv3d into a Conv2d
        with weight [Cout, Cin*kt, kh, kw] over B*T' images: the same products, summed in another order
        (equal to Conv3d to float rounding, ~1e-7 relative).
        """
        kt, kh, kw = self.kernel_size
        b, c = x.shape[:2]
        windows = x.unfold(2, kt, self.stride[0])  # [B, Cin, T', H, W, kt]
        t_out = windows.shape[2]
        stacked = windows.permute(0, 2, 1, 5, 3, 4).reshape(b * t_out, c * kt, x.shape[3], x.shape[4])
        weight = self.weight.reshape(self.out_channels, c * kt, kh, kw)
        y = F.conv2d(stacked, weight, self.bias, self.stride[1:], self.padding[1:])
        return y.unflatten(0, (b, t_out)).transpose(1, 2).contiguous()


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (Wan's RMS_norm); gamma [C,1,1,1] (video) or [C,1,1] (images)."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """residual = [RMSNorm, SiLU, conv3, RMSNorm, SiLU, Dropout, conv3] (keys residual.0/2/3/6) + shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention inside each frame (middle of encoder and decoder), residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T, H, W] -> same shape; tokens are the H*W positions of one frame."""
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Upsample(nn.Upsample):
    """Nearest-exact x2 in H and W, computed in float32 (the kernel lacks bf16 support on some builds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y = module(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling, optionally with time doubling (upsample3d) or halving (downsample3d).

    Keys: resample.1 (the Conv2d), time_conv (the 3-D variants only).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_time(x, cache)
        return x

    def _double_time(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, C, 2T (- 1 on a stream's first step), H, W].

        The stream's first frame passes through alone; every later frame becomes two frames, the two
        halves of time_conv's 2C output channels, interleaved in time.
        """
        fresh = cache is None or cache.first
        head, rest = (x[:, :, :1], x[:, :, 1:]) if fresh else (None, x)
        if rest.shape[2] == 0:
            if cache is not None:
                # The first latent alone: reserve the (zero) buffer so the cache layout is fixed from now on.
                cache.slot(x, self.time_conv.time_pad)
            return x
        y = self.time_conv(rest, cache)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _halve_time(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, C, (T+1)/2 on a first step, T/2 later, H, W].

        Windows of 3 frames with stride 2 and no padding; the stream's first frame passes through, and a
        later step starts its windows at the last frame of the previous step.
        """
        fresh = cache is None or cache.first
        if fresh:
            head = x[:, :, :1]
            if cache is not None:
                FeatureCache.store(cache.slot(x, 1), x)
            return head if x.shape[2] < 3 else torch.cat([head, self.time_conv(x)], dim=2)
        buffer = cache.slot(x, 1)
        y = self.time_conv(torch.cat([buffer.to(x.dtype), x], dim=2))
        FeatureCache.store(buffer, x)
        return y


class Encoder3d(nn.Module):
    """Video [B, 3, 1+4k, H, W] in [-1, 1] -> [B, 2*z_dim, 1+k, H/8, W/8] (mu || logvar before conv1)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != last:
                layers.append(
                    Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*layers)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(
            RMSNorm(top, images=False), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class Decoder3d(nn.Module):
    """Unnormalised latents after conv2 [B, z_dim, T, h, w] -> video [B, 3, T', 8h, 8w] (unclamped)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous stage's up-sampling convolution halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != last:
                layers.append(Resample(out_dim, "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.upsamples:
            x = layer(x, cache)
        for layer in self.head:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAE(nn.Module):
    """Wan 2.1 VAE. State-dict keys: encoder.*, conv1.*, conv2.*, decoder.* (no buffers are saved).

    `latent_mean`/`latent_std` are non-persistent buffers [z_dim], so `.to(device)` moves them and
    checkpoints stay in Wan's layout.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer("latent_mean", torch.empty(cfg.z_dim), persistent=False)
        self.register_buffer("latent_std", torch.empty(cfg.z_dim), persistent=False)
        self.reset_latent_stats()

    def reset_latent_stats(self) -> None:
        """(Re)write the normalisation constants; needed after building on the meta device and loading."""
        device = self.conv2.weight.device
        self.latent_mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=device)
        self.latent_std = torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=device)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.latent_mean.view(shape).to(like.dtype), self.latent_std.view(shape).to(like.dtype)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, z, T, h, w] -> normalised latents (mu - mean) / std."""
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> raw latents z * std + mean."""
        mean, std = self._stats(z)
        return z * std + mean

    def encode_step(self, video: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One piece of a stream: video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, z, T', H/8, W/8].

        T is 1 + 4k on the stream's first step (giving 1 + k latents) and 4k later (giving k).
        """
        stride, t = self.cfg.temporal_stride, video.shape[2]
        if (t % stride != 1) if cache.first else (t == 0 or t % stride):
            expected = (
                f"1 + {stride}k frames on a stream's first step" if cache.first else f"{stride}k frames"
            )
            raise ValueError(f"encode_step needs {expected}, got {t}")
        cache.begin_step()
        out = self.encoder(video, cache)
        cache.end_step()
        mu = self.conv1(out)[:, : self.cfg.z_dim]
        return self.normalize(mu)

    def encode(self, video: torch.Tensor, frames_per_step: int = 4) -> torch.Tensor:
        """Wan's encode: video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised mu [B, z, 1+k, H/8, W/8].

        The first frame is one step, then `frames_per_step` (a multiple of 4) frames per step, all through one
        fresh cache; the result does not depend on frames_per_step beyond float rounding. Deterministic: the
        log-variance is discarded.
        """
        stride = self.cfg.temporal_stride
        t = video.shape[2]
        if (t - 1) % stride:
            raise ValueError(f"encode needs 1 + {stride}k frames, got {t}")
        if frames_per_step <= 0 or frames_per_step % stride:
            raise ValueError(
                f"frames_per_step must be a positive multiple of {stride}, got {frames_per_step}"
            )
        cache = FeatureCache()
        pieces = [self.encode_step(video[:, :, :1], cache)]
        for start in range(1, t, frames_per_step):
            pieces.append(self.encode_step(video[:, :, start : start + frames_per_step], cache))
        return torch.cat(pieces, dim=2)

    def decode_step(self, z: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One piece of a stream: normalised latents [B, z, T, h, w] -> video [B, 3, T', 8h, 8w], unclamped.

        T' = 1 + 4(T-1) on the stream's first step and 4T later. Shapes are fixed per stream, so this is
        the unit to hand to torch.compile.
        """
        x = self.conv2(self.denormalize(z))
        cache.begin_step()
        out = self.decoder(x, cache)
        cache.end_step()
        return out

    def decode(self, z: torch.Tensor, latents_per_step: int = 1) -> torch.Tensor:
        """Whole-video decode (Wan's): normalised latents [B, z, T, h, w] -> [B, 3, 1+4(T-1), 8h, 8w].

        From a fresh cache, `latents_per_step` latents per decoder call (Wan: 1). Unclamped; pixels are
        meaningful in [-1, 1].
        """
        if latents_per_step <= 0:
            raise ValueError(f"latents_per_step must be positive, got {latents_per_step}")
        cache = FeatureCache()
        pieces = [
            self.decode_step(z[:, :, start : start + latents_per_step], cache)
            for start in range(0, z.shape[2], latents_per_step)
        ]
        return torch.cat(pieces, dim=2)


def build_vae(cfg: VAEConfig, device: torch.device | str = "cpu") -> WanVAE:
    """A VAE in eval mode without gradients; on the meta device it has shapes only (loading, inspection)."""
    with torch.device(device):
        vae = WanVAE(cfg)
    return vae.eval().requires_grad_(False)

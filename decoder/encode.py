"""Session set-up for image-to-video: the reference image and the I2V conditioning `y` for every chunk.

Wan's I2V (wan/image2video.py) conditions the DiT on y = [mask (4 ch) ; image latent (16 ch)], 20 channels
per latent frame. The image latent is the VAE encoding of the video [image, gray, gray, ...] (gray = 0 in
[-1, 1]), so latent 0 encodes the image and later latents are the causally influenced encodings of gray
frames. The mask is 1 on all 4 channels of latent 0 (the image frame) and 0 elsewhere.

Endless streams: the score model takes y per chunk. `I2VConditioning` encodes the image plus gray frames for
a finite horizon once per session (default 21 latents = Wan's 81-frame training clip, with bounded memory: 1
frame, then 4 frames per encoder step through the causal cache), and serves chunk t's slice. Chunks past the
horizon get the horizon's last chunk (its "steady-state block"): the score model runs chunks past its
training clip at the positions of the clip's last chunk (ARCHITECTURE.md §5, position mode `window`), so
they get the conditioning that chunk had in training, and the gray latents have converged by then anyway
(the encoder's temporal receptive field is finite).

The stream's chunk layout is data (`I2VConditioning.for_stream`): the paper's schedule slices 3-latent chunks
out of 21 latents; SoulX-LiveAct's (a first chunk of 6 latents, then 8, in a 14-latent window) encodes
[image, 52 gray frames] → 14 latents, as upstream's `get_y`, and serves y[:, 0:6] to chunk 0 and y[:, 6:14]
to every later chunk. Wan's "black" padding frames are zeros in [-1, 1], i.e. the gray frames here.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from decoder.feature_cache import FeatureCache
from decoder.vae import WanVAE
from proto.stream_config import StreamConfig

MASK_CHANNELS = 4


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB uint8 [H, W, 3] (numpy or torch) -> float32 [3, H, W] in [-1, 1] (Wan: to_tensor, -0.5, /0.5)."""
    pixels = torch.as_tensor(image)
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"reference image must be uint8 RGB [H, W, 3], got dtype {pixels.dtype} "
            f"shape {list(pixels.shape)}"
        )
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def area_fit_size(
    height: int, width: int, max_area: int, spatial_stride: int = 8, patch: int = 2
) -> tuple[int, int]:
    """Wan's I2V output size for an image of height x width: about max_area pixels, the image's aspect ratio,
    each side a multiple of spatial_stride * patch (16). Returns (h, w) in pixels.

    lat_h = floor(sqrt(max_area * H/W) / stride / patch) * patch, lat_w likewise with W/H; h = lat_h * stride.
    """
    aspect = height / width
    lat_h = int(math.sqrt(max_area * aspect) // spatial_stride // patch * patch)
    lat_w = int(math.sqrt(max_area / aspect) // spatial_stride // patch * patch)
    if lat_h == 0 or lat_w == 0:
        raise ValueError(
            f"max_area={max_area} is too small for a {height}x{width} image: a side would be shorter than "
            f"{spatial_stride * patch} pixels"
        )
    return lat_h * spatial_stride, lat_w * spatial_stride


def fit_to_area(image: torch.Tensor, max_area: int, spatial_stride: int = 8, patch: int = 2) -> torch.Tensor:
    """Wan's I2V preprocessing: [3, H, W] in [-1, 1] -> bicubic resize (no crop) to `area_fit_size`."""
    h, w = area_fit_size(image.shape[1], image.shape[2], max_area, spatial_stride, patch)
    return F.interpolate(image[None], size=(h, w), mode="bicubic")[0]


def fit_to_size(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fit [3, H, W] in [-1, 1] to exactly [3, height, width]: bicubic resize keeping the aspect ratio so the
    image covers the target, then a centre crop of the overflow (a streaming server's fixed frame size)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    src_h, src_w = image.shape[1], image.shape[2]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic")[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, top : top + height, left : left + width]


def i2v_mask(num_latents: int, lat_h: int, lat_w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Wan's I2V mask [4, num_latents, lat_h, lat_w]: 1 on every channel of latent 0 (the image), 0 elsewhere.

    Channel c of latent j stands for video frame 4j + c - 3, frame 0 replicated into latent 0's 4 channels.
    """
    mask = torch.zeros(MASK_CHANNELS, num_latents, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


class I2VConditioning:
    """The I2V conditioning y of one session, served per chunk.

    Attributes:
        clip: y over the horizon, [20, horizon_latents, h/8, w/8] (4 mask channels then 16 latent channels).
    """

    def __init__(
        self,
        vae: WanVAE,
        image: torch.Tensor,
        *,
        chunk_latents: int = 3,
        horizon_latents: int = 21,
        first_chunk_latents: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """image: [3, H, W] in [-1, 1], already at the stream's size (see fit_to_size / fit_to_area); H and W
        multiples of the VAE's spatial stride. first_chunk_latents: chunk 0's latents (None: chunk_latents).
        horizon_latents: latents encoded once, the first chunk plus a whole number of later chunks.
        """
        stride = vae.cfg.spatial_stride
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W] in [-1, 1], got {list(image.shape)}")
        height, width = image.shape[1], image.shape[2]
        if height % stride or width % stride:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of {stride} on each side; fit it first with "
                "fit_to_size(image, H, W) or fit_to_area(image, max_area)"
            )
        first = chunk_latents if first_chunk_latents is None else first_chunk_latents
        later = horizon_latents - first
        if chunk_latents <= 0 or first <= 0 or later < 0 or later % chunk_latents:
            raise ValueError(
                f"horizon_latents ({horizon_latents}) must be the first chunk's {first} latents plus a whole "
                f"number of chunks of chunk_latents ({chunk_latents})"
            )
        self.chunk_latents = chunk_latents
        self.first_chunk_latents = first
        self.horizon_latents = horizon_latents
        device = vae.conv2.weight.device
        latents = _encode_image_then_gray(vae, image.to(device), horizon_latents, autocast_dtype)
        mask = i2v_mask(horizon_latents, height // stride, width // stride, device=device)
        self.clip = torch.cat([mask, latents.float()], dim=0)

    @classmethod
    def for_stream(cls, vae: WanVAE, image: np.ndarray, stream: StreamConfig) -> I2VConditioning:
        """A session's conditioning from a uint8 `[H, W, 3]` reference image, fitted to the stream's size,
        with the stream's chunk size and training window as horizon."""
        fitted = fit_to_size(image_to_tensor(image), stream.height, stream.width)
        return cls(
            vae,
            fitted,
            chunk_latents=stream.chunk_latent_frames,
            horizon_latents=stream.train_latent_frames,
            first_chunk_latents=stream.frames_in_chunk(0),
        )

    @property
    def num_chunks_in_horizon(self) -> int:
        return 1 + (self.horizon_latents - self.first_chunk_latents) // self.chunk_latents

    def chunk(self, index: int) -> torch.Tensor:
        """y for chunk `index` (0-based): [20, F, h, w] with F its latents; past the horizon, its last
        chunk's y (LiveAct: chunk 0 gets latents 0..5, every later chunk 6..13)."""
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        if index == 0:
            return self.clip[:, : self.first_chunk_latents]
        block = min(index, self.num_chunks_in_horizon - 1)
        start = self.first_chunk_latents + (block - 1) * self.chunk_latents
        return self.clip[:, start : start + self.chunk_latents]


def _encode_image_then_gray(
    vae: WanVAE, image: torch.Tensor, num_latents: int, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Normalised latents [16, n, h, w] of [image, 4(n-1) gray frames] (n = num_latents), 4 frames a step."""
    stride = vae.cfg.temporal_stride
    cache = FeatureCache(dtype=autocast_dtype)
    gray = torch.zeros(1, 3, stride, *image.shape[1:], device=image.device, dtype=image.dtype)
    autocast = (
        torch.autocast(device_type=image.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        pieces = [vae.encode_step(image[None, :, None], cache)]
        pieces += [vae.encode_step(gray, cache) for _ in range(num_latents - 1)]
    return torch.cat(pieces, dim=2)[0]

"""The fast decoder option (``--vae-decoder taew2.1``): a streaming tiny video decoder for Wan 2.1 latents.

Architecture: the decoder of madebyollin/taehv's ``taew2_1`` (MIT), 9,844,611 parameters, written here
from its description (no upstream code): 16 latent channels in, RGB out, 8x up in space and 4x in time.
Frames travel as a batch ``[T, C, H, W]`` (one stream, time on the batch axis); the layers, by index in the
``decoder`` Sequential (the index is the state-dict key, ``decoder.<i>.…``, as in ``taew2_1.pth``):

    0 Clamp 3·tanh(x/3)   1 conv3x3 16->256 (+bias)   2 ReLU
    3-5 MemBlock(256)      6 nearest x2 in H, W        7 TGrow(256, x1)     8 conv3x3 256->128 (no bias)
    9-11 MemBlock(128)    12 nearest x2               13 TGrow(128, x2)    14 conv3x3 128->64 (no bias)
    15-17 MemBlock(64)    18 nearest x2               19 TGrow(64, x2)     20 conv3x3 64->64 (no bias)
    21 ReLU               22 conv3x3 64->3 (+bias)

- MemBlock(c): ``relu(conv(c)(relu(conv(c)(relu(conv(2c->c)(cat[x_t, x_{t-1}]))))) + x_t)``: each frame
  sees the block's input at the previous frame (zeros before the stream's first frame). Keys
  ``conv.0/2/4.{weight,bias}``.
- TGrow(c, s): a 1x1 conv (no bias) c -> s·c; frame t becomes s frames, the channel groups in order.
  Key ``conv.weight``. With s = 1 it is a plain 1x1 conv.

The only memory across frames is the MemBlocks' "previous input" (9 frames' worth of activations at the
three stage resolutions), so streaming carries exactly that (``TAEHVState``): its size is fixed by the
frame size, constant over the stream (at 512x512: 22 M elements, 88 MB in float32, 44 MB in bf16, against
1.24 GB of the Wan VAE's bf16 cache). A decoder call over a chunk's latents is batched over time within
the chunk (all frames of a layer at once, the previous-frame input shifted by one), which is what taehv's
``parallel=True`` computes; calling it one latent at a time gives the same frames up to float rounding.

Latents: the diffusion model's own, i.e. the normalised ``z = (mu - mean) / std`` the score model outputs
(taehv decodes "exactly what diffusion models use", no scale or shift), so no denormalisation here.

Frame accounting (the same as the Wan VAE path's): latent t gives 4 raw frames, and the stream's first 3
raw frames are dropped (taehv's ``frames_to_trim = t_upscale - 1``, its causal alignment with Wan's
decoder). So the stream's first chunk of T latents gives 4T - 3 frames (latent 0 -> 1 frame) and every
later chunk 4T, exactly ``DecodeSession.frames_for``; latent t's frames are video frames 4t-3 .. 4t as with
Wan. Pixels: taehv's are in [0, 1]; ``decode_latents`` returns ``2x - 1`` (Wan's [-1, 1] convention,
unclamped) and ``decode_chunk`` the same uint8 ``[T, H, W, 3]`` frames as ``DecodeSession`` (clamped,
rounded), so the rest of the pipeline does not know which decoder ran.

Weights: ``taew2_1.pth`` (torch state dict) or ``taew2_1.safetensors`` from the taehv repository; the
encoder's keys (``encoder.*``) are ignored, every ``decoder.*`` key must be there with its shape. Without a
checkpoint (tiny presets only) the weights are PyTorch's default initialisation under a seed, as the tiny
Wan VAE's are (output bias raised by 0.5, ``build_taehv``). Tested against upstream's own ``taehv.py``
(tests/oracles/make_taehv_fixtures.py, tests/decoder/test_taehv.py). The released weights themselves were
not available here; unverified: that the published file's shapes are those above (a larger time-growing
kernel at ``decoder.7`` is cut as upstream's loader cuts it, see ``check_taehv_state_dict``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from decoder.streaming import frames_to_uint8

LATENT_CHANNELS = 16
SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4
FRAMES_TO_TRIM = TEMPORAL_STRIDE - 1  # raw frames dropped at a stream's start (latent 0 -> 1 frame)
STAGE_CHANNELS = (256, 128, 64, 64)
STAGE_TIME_GROWTH = (1, 2, 2)  # TGrow stride per stage: 1 * 2 * 2 = TEMPORAL_STRIDE
MEMBLOCKS_PER_STAGE = 3
VAE_DECODER_CHOICES = ("wan2.1", "taew2.1")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class TAEHVCheckpointError(ValueError):
    """A taew2.1 checkpoint is unreadable or does not have the decoder's keys and shapes."""


class TanhClamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): 3·tanh(x/3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(x / 3.0)


class MemBlock(nn.Module):
    """Residual block that also sees the previous frame's input (module docstring); channels in = out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """x, past [T, C, H, W] (past[t] = the block's input at frame t - 1) -> [T, C, H, W]."""
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """Frame t -> ``stride`` frames: a 1x1 conv to stride·C channels, split into stride frames in order."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C, H, W] -> [T·stride, C, H, W]."""
        t, c, h, w = x.shape
        return self.conv(x).reshape(t * self.stride, c, h, w)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 in height and width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


@dataclass
class TAEHVState:
    """What a stream carries between decoder calls: each MemBlock's input at the last frame seen, and the
    raw frames produced so far (the first ``FRAMES_TO_TRIM`` are dropped).

    The buffers are allocated (zeros: "no previous frame") on the stream's first call and written in place
    afterwards, so their number, shapes and bytes are fixed for the life of the stream.
    """

    memory_format: torch.memory_format = torch.contiguous_format
    buffers: list[torch.Tensor] = field(default_factory=list)
    raw_frames: int = 0

    def slot(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """MemBlock ``index``'s buffer [1, C, H, W] (allocated as zeros the first time, like ``like``)."""
        if index == len(self.buffers):
            self.buffers.append(
                torch.zeros_like(like[:1], memory_format=self.memory_format, requires_grad=False)
            )
        buffer = self.buffers[index]
        if buffer.shape[1:] != like.shape[1:]:
            raise ValueError(
                f"taew2.1 stream state: MemBlock {index} holds frames of {list(buffer.shape[1:])}, this call "
                f"brings {list(like.shape[1:])}; a stream keeps one frame size (open a new session)"
            )
        return buffer

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class TAEHVDecoder(nn.Module):
    """The taew2_1 decoder (module docstring). State-dict keys ``decoder.<i>.…`` as in ``taew2_1.pth``."""

    def __init__(self) -> None:
        super().__init__()
        c = STAGE_CHANNELS
        layers: list[nn.Module] = [TanhClamp(), nn.Conv2d(LATENT_CHANNELS, c[0], 3, padding=1), nn.ReLU()]
        for stage, growth in enumerate(STAGE_TIME_GROWTH):
            layers += [MemBlock(c[stage]) for _ in range(MEMBLOCKS_PER_STAGE)]
            layers += [
                Upsample2x(),
                TGrow(c[stage], growth),
                nn.Conv2d(c[stage], c[stage + 1], 3, padding=1, bias=False),
            ]
        layers += [nn.ReLU(), nn.Conv2d(c[-1], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    def decode_step(self, z: torch.Tensor, state: TAEHVState) -> torch.Tensor:
        """One piece of a stream: latents [T, 16, h, w] -> raw frames [4T, 3, 8h, 8w] (~[0, 1], unclamped).

        No frame is dropped here (``TAEHVSession`` trims the stream's first three). Carries ``state``.
        """
        x = z.contiguous(memory_format=state.memory_format)
        memory = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                buffer = state.slot(memory, x)
                past = torch.cat([buffer.to(x.dtype), x[:-1]], dim=0)  # frame t sees frame t - 1
                buffer.copy_(x[-1:])
                x = layer(x, past)
                memory += 1
            else:
                x = layer(x)
        state.raw_frames += x.shape[0]
        return x


def build_taehv(seed: int | None = None, device: torch.device | str = "cpu") -> TAEHVDecoder:
    """The decoder in eval mode without gradients; ``seed``: PyTorch's default initialisation under that seed
    (the tiny presets' random weights, as ``server.master.build_master_vae`` seeds the tiny Wan VAE), with
    the output bias raised by 0.5: taehv's pixels are [0, 1] and the default initialisation centres the
    output at 0, which would clamp half of it to black (0.5 makes it mid-grey noise, visible in plumbing
    tests and demos)."""
    if seed is None:
        with torch.device(device):
            model = TAEHVDecoder()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TAEHVDecoder().to(device)
        with torch.no_grad():
            model.decoder[-1].bias += 0.5
    return model.eval().requires_grad_(False)


def read_taehv_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a taehv checkpoint on CPU: .pth/.pt (torch.load, weights_only) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise TAEHVCheckpointError(
            f"taew2.1 checkpoint {path} does not exist; download taew2_1.pth (or "
            "safetensors/taew2_1.safetensors) from github.com/madebyollin/taehv and pass its path"
        )
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise TAEHVCheckpointError(
                f"taew2.1 checkpoint {path} ({size} bytes) is not a readable safetensors file ({err}); "
                "truncated, or a Git LFS pointer instead of the weights?"
            ) from err
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError variously
            raise TAEHVCheckpointError(
                f"taew2.1 checkpoint {path} ({size} bytes) could not be read by torch.load "
                f"({type(err).__name__}: {err}); truncated, a Git LFS pointer, or not a state dict?"
            ) from err
    else:
        raise TAEHVCheckpointError(
            f"taew2.1 checkpoint {path} has an unknown suffix {path.suffix!r}; use .pth or .safetensors"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise TAEHVCheckpointError(
            f"taew2.1 checkpoint {path} is not a plain state dict of tensors (taew2_1.pth layout); "
            f"top level: {top}"
        )
    return state


def check_taehv_state_dict(
    state: dict[str, torch.Tensor], model: TAEHVDecoder, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The decoder's tensors of ``state`` (``encoder.*`` dropped), checked against ``model``'s keys and
    shapes; raises ``TAEHVCheckpointError`` naming the key and both shapes.

    A time-growing kernel stored with more output channels than this model's (``decoder.7`` trained to
    double time, used here with stride 1) keeps its last ones, the last time step's, as upstream's loader
    (``patch_tgrow_layers``) does.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    foreign = [k for k in state if not k.startswith(("decoder.", "encoder."))]
    if foreign:
        raise TAEHVCheckpointError(
            f"{source} has {len(foreign)} keys that are neither decoder.* nor encoder.*, e.g. {foreign[:3]}; "
            "not a taehv checkpoint (a prefixed wrapper, or a different model?)"
        )
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    out = {}
    # Shapes first: a file of another taehv variant is named as such, not as "partial".
    for key, shape in expected.items():
        if key not in decoder:
            continue
        tensor = decoder[key]
        if not tensor.is_floating_point():
            raise TAEHVCheckpointError(f"{source} key {key} has dtype {tensor.dtype}, expected a float dtype")
        got = tuple(tensor.shape)
        module = model.get_submodule(key.rsplit(".", 2)[0]) if key.endswith(".conv.weight") else None
        if got != shape and isinstance(module, TGrow) and got[1:] == shape[1:] and got[0] % shape[0] == 0:
            tensor = tensor[-shape[0] :]
        elif got != shape:
            raise TAEHVCheckpointError(
                f"{source} key {key} has shape {list(got)}, the taew2.1 decoder expects {list(shape)}; "
                "a checkpoint for another latent space (taew2_2: 48 channels, taehv1_5: 32)?"
            )
        out[key] = tensor
    missing = [k for k in expected if k not in decoder]
    if missing:
        raise TAEHVCheckpointError(
            f"{source} lacks {len(missing)} of the {len(expected)} taew2.1 decoder tensors, e.g. "
            f"{missing[0]} (expected shape {list(expected[missing[0]])}); an encoder-only or partial file?"
        )
    unexpected = [k for k in decoder if k not in expected]
    if unexpected:
        raise TAEHVCheckpointError(
            f"{source} has decoder keys taew2.1 does not have, e.g. {unexpected[:3]} "
            f"({list(decoder[unexpected[0]].shape)}); another taehv variant (taehv1_5, taew2_2, *_super)?"
        )
    return out


def check_taehv_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raise ``TAEHVCheckpointError`` unless ``path`` holds the taew2.1 decoder's keys and shapes (start-up
    check of ``--taehv-checkpoint``, before any rank starts; nothing is kept)."""
    check_taehv_state_dict(
        read_taehv_state_dict(path), build_taehv(device="meta"), source=f"taew2.1 checkpoint {path}"
    )


def load_taehv(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TAEHVDecoder:
    """The decoder with the weights at ``path`` (checked by ``check_taehv_state_dict``), on device/dtype.

    Keep float32 weights and autocast for bf16/fp16 compute, as with the Wan VAE.
    """
    model = build_taehv(device="meta")
    tensors = check_taehv_state_dict(read_taehv_state_dict(path), model, source=f"taew2.1 checkpoint {path}")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def convert_to_channels_last(model: TAEHVDecoder) -> TAEHVDecoder:
    """Conv weights in channels-last layout (faster cuDNN NHWC convs in bf16/fp16; on CPU a layout change)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


class TAEHVSession:
    """Decode state of one stream with the taew2.1 decoder; the interface of ``DecodeSession``.

    Sessions share one ``TAEHVDecoder`` (read-only) and each carries its own ``TAEHVState``.
    """

    def __init__(
        self,
        model: TAEHVDecoder,
        height: int,
        width: int,
        *,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        chunk_at_once: bool = False,
    ) -> None:
        """height, width: output frame size in pixels, positive multiples of 8.

        autocast_dtype: None runs in the model's dtype; torch.bfloat16/float16 autocast (state in that
        dtype).
        chunk_at_once: one decoder call per chunk (batched over its frames); False: one call per latent.
        """
        if height <= 0 or width <= 0 or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
            raise ValueError(
                f"decode size {height}x{width} is not supported by taew2.1: height and width must be "
                f"positive multiples of {SPATIAL_STRIDE}"
            )
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
            )
        self.model = model
        self.height = height
        self.width = width
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.chunk_at_once = chunk_at_once
        self.state = TAEHVState(torch.channels_last if channels_last else torch.contiguous_format)
        self.latents_decoded = 0
        self.frames_decoded = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents this session accepts."""
        return self.height // SPATIAL_STRIDE, self.width // SPATIAL_STRIDE

    def frames_for(self, num_latents: int) -> int:
        """Frames the next ``num_latents`` latents decode to: 4n - 3 at the stream start, 4n later."""
        return TEMPORAL_STRIDE * num_latents - (FRAMES_TO_TRIM if self.latents_decoded == 0 else 0)

    def cache_nbytes(self) -> int:
        """Bytes of the stream state (constant after the first call)."""
        return self.state.nbytes()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [16, T, h, w] (or [1, 16, T, h, w]) -> video [1, 3, T', H, W] in Wan's [-1, 1], unclamped.

        T' = ``frames_for(T)``. One decoder call per latent, or one for the chunk (``chunk_at_once``).
        """
        z = self._check_latents(latents)[0].transpose(0, 1)  # [T, 16, h, w]: time on the batch axis
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        skip = max(0, FRAMES_TO_TRIM - self.state.raw_frames)
        with torch.inference_mode(), autocast:
            if self.chunk_at_once:
                raw = self.model.decode_step(z, self.state)
            else:
                raw = torch.cat([self.model.decode_step(z[i : i + 1], self.state) for i in range(len(z))])
        video = (raw[skip:].float() * 2.0 - 1.0).transpose(0, 1).unsqueeze(0)  # [1, 3, T', H, W]
        self.frames_decoded += video.shape[2]
        self.latents_decoded += z.shape[0]
        return video

    def decode_chunk(
        self,
        latents: torch.Tensor,
        *,
        stream: torch.cuda.Stream | None = None,
        synchronize: bool = False,
    ) -> torch.Tensor:
        """Latent chunk [16, T, h, w] -> frames uint8 [T', H, W, 3] on the model's device (``DecodeSession``'s
        contract: ``stream`` is the CUDA stream to run on, nothing synchronises unless ``synchronize``)."""
        if stream is None:
            return self._decode_to_uint8(latents, synchronize)
        if latents.is_cuda:
            latents.record_stream(stream)  # the allocator must not reuse it before this stream is done
        with torch.cuda.stream(stream):
            return self._decode_to_uint8(latents, synchronize)

    def _decode_to_uint8(self, latents: torch.Tensor, synchronize: bool) -> torch.Tensor:
        frames = frames_to_uint8(self.decode_latents(latents))
        if synchronize and frames.is_cuda:
            torch.cuda.current_stream(frames.device).synchronize()
        return frames

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.unsqueeze(0) if latents.dim() == 4 else latents
        h, w = self.latent_size
        if (
            z.dim() != 5
            or z.shape[0] != 1
            or z.shape[1] != LATENT_CHANNELS
            or z.shape[3:] != (h, w)
            or z.shape[2] == 0
        ):
            raise ValueError(
                f"latent chunk has shape {list(latents.shape)}; this taew2.1 session decodes "
                f"{self.height}x{self.width} and expects [{LATENT_CHANNELS}, T>=1, {h}, {w}]"
            )
        if z.device != self.device:
            raise ValueError(f"latent chunk is on {z.device} but the session's decoder is on {self.device}")
        return z

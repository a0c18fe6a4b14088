"""`talkingmachines inspect --vae NAME`: parameters, FLOPs per chunk and decode-cache memory of a VAE preset.

Everything is built and run on the meta device (shapes only, no weights, no compute), so the full `wan2.1`
numbers come out in about a second on any machine. FLOPs count a multiply-add as 2: convolutions
2 * out_elements * Cin/groups * kernel_volume (bias ignored) and the middle attention's QK^T and AV products
4 * frames * (H*W)^2 * C; element-wise work (norms, SiLU, up-sampling) is left out. At 512x512 `wan2.1` this
gives 2.84 TFLOP for latent 0 and 8.88 TFLOP per later latent (26.6 per 3-latent chunk); reference/wan.md's
2.82 / 8.86 leave out the ~0.03 TFLOP of attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from decoder.feature_cache import FeatureCache
from decoder.vae import AttentionBlock, WanVAE, build_vae
from proto.vae_config import get_vae_preset

CHUNK_LATENTS = 3


class _FlopCounter:
    """Forward hooks adding up convolution and attention FLOPs of the modules they are attached to."""

    def __init__(self, model: nn.Module) -> None:
        self.flops = 0
        self._handles = []
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                self._handles.append(module.register_forward_hook(self._conv))
            elif isinstance(module, AttentionBlock):
                self._handles.append(module.register_forward_hook(self._attention))

    def _conv(self, module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kernel = module.weight.shape[1:].numel()  # Cin/groups * kernel volume
        self.flops += 2 * output.numel() * kernel

    def _attention(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        b, c, t, h, w = inputs[0].shape
        self.flops += 4 * b * t * (h * w) ** 2 * c

    def take(self) -> int:
        flops, self.flops = self.flops, 0
        return flops

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _parameter_counts(vae: WanVAE) -> dict[str, int]:
    counts = {part: 0 for part in ("encoder", "conv1", "conv2", "decoder")}
    for key, tensor in vae.state_dict().items():
        counts[key.split(".", 1)[0]] += tensor.numel()
    counts["total"] = sum(counts.values())
    return counts


def describe_vae(name: str, height: int = 512, width: int = 512) -> dict[str, Any]:
    """Facts about VAE preset `name` at height x width pixels (multiples of the spatial stride).

    Returns a JSON-ready dict: parameters (total and per part), state-dict tensor count, decode FLOPs for
    latent 0, a later latent, the first 3-latent chunk and a later chunk, encode FLOPs, and the decode
    feature-cache size per session (elements and bytes in float32 and bf16).
    """
    cfg = get_vae_preset(name)
    stride = cfg.spatial_stride
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ValueError(f"inspect size {height}x{width} must be positive multiples of {stride}")
    vae = build_vae(cfg, device="meta")
    lat_h, lat_w = height // stride, width // stride
    counter = _FlopCounter(vae)
    cache = FeatureCache(dtype=torch.float32)
    latent = torch.empty(1, cfg.z_dim, 1, lat_h, lat_w, device="meta")
    vae.decode_step(latent, cache)
    decode_first = counter.take()
    vae.decode_step(latent, cache)
    decode_later = counter.take()
    cache_elements = sum(b.numel() for b in cache.buffers)
    enc_cache = FeatureCache(dtype=torch.float32)
    vae.encode_step(torch.empty(1, 3, 1, height, width, device="meta"), enc_cache)
    encode_first = counter.take()
    vae.encode_step(torch.empty(1, 3, cfg.temporal_stride, height, width, device="meta"), enc_cache)
    encode_later = counter.take()
    counter.remove()
    frames_later = cfg.temporal_stride * CHUNK_LATENTS
    return {
        "preset": name,
        "height": height,
        "width": width,
        "latent_shape_per_chunk": [cfg.z_dim, CHUNK_LATENTS, lat_h, lat_w],
        "parameters": _parameter_counts(vae),
        "state_dict_tensors": len(vae.state_dict()),
        "frames_per_chunk": {"first": frames_later - (cfg.temporal_stride - 1), "later": frames_later},
        "decode_flops": {
            "first_latent": decode_first,
            "later_latent": decode_later,
            "first_chunk": decode_first + (CHUNK_LATENTS - 1) * decode_later,
            "later_chunk": CHUNK_LATENTS * decode_later,
        },
        "encode_flops": {"first_frame": encode_first, "per_4_frames": encode_later},
        "decode_cache": {
            "tensors": len(cache.buffers),
            "elements": cache_elements,
            "bytes_float32": cache_elements * 4,
            "bytes_bf16": cache_elements * 2,
        },
    }


def _si(value: float) -> str:
    """1.23e12 -> '1.23 T' (decimal prefixes, for FLOPs and bytes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f} {prefix}"
    return f"{value:.0f} "


def format_vae_description(info: dict[str, Any]) -> str:
    """Human-readable text of `describe_vae`'s dict."""
    p, d, e, c = info["parameters"], info["decode_flops"], info["encode_flops"], info["decode_cache"]
    frames = info["frames_per_chunk"]
    lines = [
        f"VAE preset {info['preset']} at {info['height']}x{info['width']} "
        f"(latent chunk {info['latent_shape_per_chunk']})",
        f"  parameters      {p['total']:,} (encoder {p['encoder']:,}, decoder {p['decoder']:,}, "
        f"conv1 {p['conv1']:,}, conv2 {p['conv2']:,}); {info['state_dict_tensors']} tensors",
        f"  decode FLOPs    latent 0 {_si(d['first_latent'])}FLOP, "
        f"later latent {_si(d['later_latent'])}FLOP; "
        f"first chunk ({frames['first']} frames) {_si(d['first_chunk'])}FLOP, "
        f"later chunk ({frames['later']} frames) {_si(d['later_chunk'])}FLOP",
        f"  encode FLOPs    first frame {_si(e['first_frame'])}FLOP, "
        f"per 4 frames {_si(e['per_4_frames'])}FLOP",
        f"  decode cache    {c['tensors']} tensors, {c['elements']:,} elements per session: "
        f"{_si(c['bytes_float32'])}B float32, {_si(c['bytes_bf16'])}B bf16 (constant over the stream)",
    ]
    return "\n".join(lines)


def main_inspect_vae(name: str, height: int = 512, width: int = 512) -> str:
    """The text `talkingmachines inspect --vae NAME` prints."""
    return format_vae_description(describe_vae(name, height, width))

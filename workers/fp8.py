"""FP8 (float8_e4m3fn) matrix products for the DiT's large linear layers, and the FP8 helpers of the KV cache.

The choice: W8A8 with e4m3 on both operands. Weights are quantised once, when the model is converted (after
its weights load), with one float32 scale per output row (per tensor on GPUs below sm_90); activations are
quantised dynamically at every call, one scale per token (row) of the input (per tensor with per-tensor
weights), and the product runs in ``torch._scaled_mm`` (cuBLASLt / CUTLASS FP8 GEMM, float32 accumulation,
bf16 output, bias added in the epilogue). Scales are amax-based: ``scale = amax / 448`` (448 = e4m3's
largest finite value), ``q = clamp(x / scale, ±448)`` cast to e4m3 (round to nearest even), ``x ≈ q·scale``.

Why this and what was read (public code, reference only):
- Soul-AILab/SoulX-LiveAct ``fp8_gemm.py`` (``FP8Linear`` / ``enable_fp8_gemm``, behind ``generate.py
  --fp8_gemm``): the same W8A8 scheme through vLLM's ``Fp8LinearOp`` (dynamic per-token activation scales,
  ``act_quant_group_shape=PER_TOKEN``; the weight quantised once, per tensor, by ``scaled_fp8_quant``),
  applied to every ``nn.Linear`` of the DiT. Its CPU path falls back to the bf16 layer silently; here the
  serving path never falls back (``fp8_supported`` refuses at start-up) and only the quality check and the
  tests emulate. LiveAct's ``model_liveact/model_memory.py`` (``_quantize_kv_tensor``) also stores its KV
  cache in e4m3 with one float32 amax scale per (token, head) over head_dim, dequantised to bf16 on use: the
  layout of ``workers.kv_cache.Fp8KV``.
- torchao's float8 inference (``Float8DynamicActivationFloat8WeightConfig`` with ``PerRow`` / ``PerTensor``
  granularity, ``Float8LinearRecipeName.ROWWISE``, docs.pytorch.org/ao): the same two granularities, both
  operands alike, rowwise through CUTLASS (``_scaled_mm`` with ``[M, 1]`` and ``[1, N]`` scales). pytorch
  issue #130359 reports rowwise ``_scaled_mm`` failing on an L4 (sm_89), so rowwise is used from sm_90 on and
  Ada (sm_89) gets per-tensor scales.
- vLLM-Omni's FP8 DiT guide (found by search, not read in full) notes that sensitive layers stay bf16; NVlabs/
  LongLive ``interactive_inference_quantized.py`` loads a quantised checkpoint but computes in bf16 (no FP8
  GEMM); Alibaba-Quark/LiveAvatar's stored sources show no FP8 path.
Per-row weight scales cost nothing at run time (one multiply per output in the epilogue) and keep each
output channel's own range, so they were chosen over LiveAct's per-tensor weight scale where the GPU allows.

What is converted (``FP8_LAYERS``, by module name): per block the self-attention ``q, k, v, o``, the cross-
attention ``q, k, v, o`` and its image (``k_img, v_img``) and TalkingMachines audio (``k_audio, v_audio``)
projections, InfiniteTalk/LiveAct's ``audio_cross_attn.{q_linear, kv_linear, proj}``, and the FFN
(``ffn.0``, ``ffn.2``): 91.9 % of talkingmachines-18b's parameters (its 1.2B-parameter audio projection MLP
stays) and 98.3 % of soulx-liveact's, and nearly all of the per-token FLOPs. What stays in the
model's dtype (``KEPT_LAYERS``), as Wan keeps them in float32 islands or as they are small and run once per
session/chunk: ``patch_embedding``, ``text_embedding``, ``time_embedding``, ``time_projection``, every
``modulation``, the ``head``, all norms, ``img_emb`` (CLIP projection), ``audio_proj`` (the audio MLP) and
LiveAct's ``memory_proj_k/v`` convolutions. A named layer whose in/out features are not multiples of 16 (the
FP8 GEMM's alignment) is kept too, in emulation as on the GPU, so that the emulation predicts the GPU.

Modes of ``Fp8Linear``: ``scaled_mm`` (serving; CUDA with compute capability >= 8.9 only) and ``emulate``
(quantise-dequantise both operands with the same scales and rounding, then a float32 matmul; for
``workers.fp8_check`` on machines without FP8 GEMMs and the CPU tests, never chosen by the serving path).
The emulation differs from the GPU kernel only by the kernel's accumulation order (and, with
``use_fast_accum``, not used here, its accumulator precision).

Unmeasured on a GPU: the speed and the real-kernel agreement of ``scaled_mm`` mode (benchmarks/gpu_check.sh
has the case). Nothing here is on by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448.0
# Smallest scale: an all-zero row quantises to zeros instead of dividing by zero (LiveAct clamps at 1e-12).
MIN_SCALE = 1e-12
# torch._scaled_mm needs both matrix dimensions it reduces over / writes to be multiples of 16.
GEMM_ALIGNMENT = 16
# FP8 tensor cores: Ada (sm_89) and newer; rowwise-scaled _scaled_mm from Hopper (sm_90) on.
MIN_CAPABILITY = (8, 9)
ROWWISE_CAPABILITY = (9, 0)

Granularity = Literal["row", "tensor"]
Mode = Literal["scaled_mm", "emulate"]
FP8_CHOICES = ("off", "linear")
KV_CACHE_DTYPES = ("auto", "fp8")

# The DiT's large linear layers that `convert_to_fp8` replaces (full module names; block index any).
FP8_LAYERS = re.compile(
    r"blocks\.\d+\.(?:"
    r"self_attn\.(?:q|k|v|o)"
    r"|cross_attn\.(?:q|k|v|o|k_img|v_img|k_audio|v_audio)"
    r"|audio_cross_attn\.(?:q_linear|kv_linear|proj)"
    r"|ffn\.(?:0|2)"
    r")"
)
# What stays in the model's dtype, by name (prefixes of parameter names; documented above).
KEPT_LAYERS = (
    "patch_embedding",
    "text_embedding",
    "time_embedding",
    "time_projection",
    "blocks.*.modulation",
    "blocks.*.norm*",
    "blocks.*.self_attn.norm_q/norm_k",
    "blocks.*.cross_attn.norm_*",
    "blocks.*.self_attn.memory_proj_k/v",
    "head",
    "img_emb",
    "audio_proj",
)


# ---- quantise / dequantise ---------------------------------------------------------------------------


def quantize(x: torch.Tensor, granularity: Granularity = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., K]` (any float dtype) → (q `[..., K]` float8_e4m3fn, scale float32).

    granularity "row": one scale per row over the last dim, shape `[..., 1]`; "tensor": one scale, shape
    `[1] * x.ndim`. scale = max(amax / 448, 1e-12); q = clamp(x / scale, −448, 448) rounded to e4m3, so the
    largest |x| of a row (tensor) maps to ±448. The clamp is explicit so that the result does not depend on
    how a cast treats overflow (e4m3fn has no infinity; an out-of-range cast may saturate or give NaN).
    Dequantise with `dequantize`.
    """
    xf = x.float()
    if granularity == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif granularity == "tensor":
        amax = xf.abs().amax().reshape([1] * x.ndim)
    else:
        raise ValueError(f"granularity must be 'row' or 'tensor', got {granularity!r}")
    scale = torch.clamp(amax / E4M3_MAX, min=MIN_SCALE)
    q = torch.clamp(xf / scale, -E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantised to e4m3 with a given float32 scale (broadcast), clamped to ±448 (saturating)."""
    return torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (e4m3) · scale, computed in float32 (exact: an e4m3 value times a float32 scale rounds once), then
    cast to ``dtype``."""
    return (q.float() * scale).to(dtype)


# ---- the device check -----------------------------------------------------------------------------------


def fp8_supported(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs FP8 matrix products (``torch._scaled_mm``), and why (or why not).

    True only for a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) with a torch that has
    ``_scaled_mm``. On CUDA this initialises torch's CUDA state in the calling process (a rank, before it
    loads weights); ``server.options`` refuses CPU without touching CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, (
            f"FP8 matrix products (torch._scaled_mm) need a CUDA GPU of compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper or newer); the device is {device.type}"
        )
    if not torch.cuda.is_available():
        return False, "FP8 matrix products need a CUDA GPU, and torch sees none (torch.cuda.is_available())"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"this torch ({torch.__version__}) has no torch._scaled_mm"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if capability < MIN_CAPABILITY:
        return False, (
            f"{name} is sm_{capability[0]}{capability[1]}; FP8 matrix products need compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper or newer)"
        )
    return True, f"{name} sm_{capability[0]}{capability[1]}"


def require_fp8(device: str | torch.device) -> None:
    """Raise ``ValueError`` naming the flag and the fix when ``device`` cannot run ``--fp8 linear``."""
    ok, reason = fp8_supported(device)
    if not ok:
        raise ValueError(f"--fp8 linear is not available here: {reason}; run without --fp8 (or --fp8 off)")


def granularity_for(device: str | torch.device) -> Granularity:
    """Rowwise scales from sm_90 on (CUTLASS rowwise kernel), per-tensor on sm_89 and on non-CUDA devices."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) >= ROWWISE_CAPABILITY:
            return "row"
        return "tensor"
    return "row"


# ---- the layer ------------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight `[out, in]` and its float32 scale (`[out, 1]` per row, `[1, 1]` per
    tensor, buffers ``weight_fp8`` / ``weight_scale``); the bias stays a parameter in its original dtype.

    forward: x `[..., in]` in the model's dtype → `[..., out]` in x's dtype. The input is quantised per row
    (token) with per-row weights, per tensor with per-tensor weights (``_scaled_mm`` takes both alike).
    mode ``scaled_mm``: ``torch._scaled_mm`` (CUDA, sm_89+; bias in the epilogue); ``emulate``: the same
    quantised operands dequantised and multiplied in float32, the bias added in float32, then cast.
    """

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        granularity: Granularity,
        mode: Mode,
    ) -> None:
        super().__init__()
        if mode not in ("scaled_mm", "emulate"):
            raise ValueError(f"Fp8Linear mode must be 'scaled_mm' or 'emulate', got {mode!r}")
        self.out_features, self.in_features = weight_fp8.shape
        self.granularity: Granularity = granularity
        self.mode: Mode = mode
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: Granularity = "row", mode: Mode = "scaled_mm"):
        """Quantise ``linear``'s weight once (amax scales of ``granularity``); the bias is kept as it is."""
        q, scale = quantize(linear.weight.detach(), granularity)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.contiguous(), scale.contiguous(), bias, granularity, mode)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, granularity={self.granularity}, mode={self.mode}"
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the products use, `[out, in]`: e4m3 values times their scales."""
        return dequantize(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize(x2, self.granularity)
        if self.mode == "emulate":
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(dequantize(xq, xs), self.dequantized_weight(), bias).to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = torch._scaled_mm(
                xq,
                self.weight_fp8.t(),  # [in, out], column-major as the kernel wants
                scale_a=xs,  # [M, 1] or [1, 1]
                scale_b=self.weight_scale.t(),  # [1, out] or [1, 1]
                bias=bias,
                out_dtype=x.dtype,
            )
        return out.reshape(*lead, self.out_features)


# ---- converting a model ---------------------------------------------------------------------------------


@dataclass
class Fp8Conversion:
    """What ``convert_to_fp8`` did: converted layer names, kept ``nn.Linear`` names (with why), bytes."""

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    granularity: str = "row"
    mode: str = "scaled_mm"

    def summary(self) -> str:
        return (
            f"FP8 W8A8 e4m3 ({self.mode}, {self.granularity} scales): {len(self.converted)} linear layers "
            f"converted, {len(self.kept)} kept in the model dtype"
        )


def is_fp8_layer(name: str) -> bool:
    """Whether module ``name`` is one of the DiT's large linear layers that FP8 converts (``FP8_LAYERS``)."""
    return FP8_LAYERS.fullmatch(name) is not None


def _aligned(linear: nn.Linear) -> bool:
    return linear.in_features % GEMM_ALIGNMENT == 0 and linear.out_features % GEMM_ALIGNMENT == 0


@torch.no_grad()
def convert_to_fp8(
    model: nn.Module, *, mode: Mode = "scaled_mm", granularity: Granularity = "row"
) -> Fp8Conversion:
    """Replace the DiT's large ``nn.Linear`` layers (``FP8_LAYERS``) by ``Fp8Linear`` in place.

    Every other module keeps its dtype (``KEPT_LAYERS``); a named layer whose features are not multiples of
    16 is kept and reported. One layer at a time, so the peak is the model plus one layer's e4m3 copy; the
    replaced layer's high-precision weight is freed with it. ``mode="emulate"`` is for ``workers.fp8_check``
    and tests only (module docstring)."""
    report = Fp8Conversion(granularity=granularity, mode=mode)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if not is_fp8_layer(name):
            report.kept[name] = "kept in the model dtype (not one of the DiT's large linear layers)"
            continue
        if not _aligned(module):
            report.kept[name] = (
                f"features {module.in_features} -> {module.out_features} are not multiples of "
                f"{GEMM_ALIGNMENT}"
            )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(module, granularity, mode))
        report.converted.append(name)
    return report


def fp8_weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s weights after ``convert_to_fp8`` if its parameters were ``dtype``: each converted
    layer's weight at 1 byte an element plus its float32 row scales; everything else (biases included) at
    ``dtype``'s size. Works on the meta device (``engine.memory_plan``)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    converted: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_fp8_layer(name) and _aligned(module):
            converted.add(f"{name}.weight")
            total += module.weight.numel() + module.out_features * 4
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if name not in converted:
            total += tensor.numel() * size
    return total

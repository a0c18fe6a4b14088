"""The one attention function every DiT attention call goes through, with selectable backends.

Layout is `[B, L, H, D]` for q, k and v (the layout the KV cache stores and that Ulysses sequence
parallelism re-shards), output `[B, Lq, H, D]`. Concrete backends (`KERNELS`):

- `fa3`: FlashAttention-3 (`flash_attn_interface.flash_attn_func`, built from flash-attn's `hopper/`),
  Hopper (compute capability 9.x) only;
- `cudnn`: PyTorch SDPA restricted to `SDPBackend.CUDNN_ATTENTION` (`torch.nn.attention.sdpa_kernel`);
  PyTorch made cuDNN attention opt-in after correctness bugs in 2.5 (pytorch/pytorch#138522), so on an
  H100 it runs only when asked for by name;
- `fa2`: flash-attn's `flash_attn_func` (FlashAttention-2), compute capability >= 8.0; `flash` is an alias
  (the name this backend had before the others existed);
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, PyTorch's own dispatch (any device, any
  dtype, an optional boolean mask);
- `math`: explicit softmax in float32, for tests and debugging.

The three CUDA kernels need CUDA fp16/bf16 inputs and a head dim that is a multiple of 8 and at most 256
(cuDNN at most 128 below Hopper), and take no mask. **Every backend handles every call**: a call its kernel
cannot take (a mask — the sparse-causal and teacher-forcing masks of the full-sequence references and of
training, which no flash/varlen/causal form expresses exactly —, float32 inputs, an unsupported head dim,
CPU tensors) runs through `sdpa` with the mask, the same result within the dtype's rounding. The streaming
engine's own passes never use a mask, so they run on the named kernel.

`auto` resolves once, from what is installed and what the device supports (`resolve_attention_backend`:
device type, compute capability, dtype, head dim), in this order:

1. `fa3` — on Hopper the fastest published forward of the three (FlashAttention-3 paper: 1.5-2x FA2 in
   bf16) and what Hopper peers run (LiveAvatar, LightX2V); installed only on purpose (a separate build), so
   picking it when present follows what the operator chose;
2. `fa2` — what `auto` picked before (the Docker image's optional flash-attn build);
3. `sdpa` — everything else (on CUDA PyTorch dispatches to its own flash / memory-efficient kernels).

`cudnn` is never picked by `auto`: it is opt-in in PyTorch itself and unmeasured here (name it with
`--attention-backend cudnn`). None of the orders has been measured on a GPU in this project
(`benchmarks/forward_speed.py` measures them; see the README).

The process-wide default: `TM_ATTENTION_BACKEND` at import, `set_attention_backend`, or
`configure_attention_backend` (what `run`/`serve` call once at start-up with `--attention-backend`, which
refuses a backend the device cannot run and pins `auto` to its resolution); a call can override it.
Unconfigured, `auto` resolves per (device, dtype, head dim) and caches the answer.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The names `--attention-backend` accepts; `flash` is `fa2`'s older name.
BACKENDS = ("auto", "fa3", "cudnn", "fa2", "flash", "sdpa", "math")
# The concrete backends a name resolves to.
KERNELS = ("fa3", "cudnn", "fa2", "sdpa", "math")
ALIASES = {"flash": "fa2"}
# `auto`'s preference order (module docstring); cudnn is opt-in.
AUTO_ORDER = ("fa3", "fa2", "sdpa")
# Head dims the CUDA kernels take: multiples of 8 up to this (cuDNN below Hopper: 128).
MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM_PRE_HOPPER = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Device types the flash/cuDNN kernels run on. Only tests widen it (with fake kernels), never product code.
KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_INSTALL_HINT = {
    "fa3": "FlashAttention-3 is not installed (the `flash_attn_interface` module, built from flash-attn's "
    "hopper/ directory: cd flash-attention/hopper && python setup.py install)",
    "fa2": "flash-attn is not installed (pip install flash-attn, or build the Docker image with "
    "--build-arg FLASH_ATTN=1)",
}


def _import_kernel(module: str) -> Callable[..., object] | None:
    try:
        return importlib.import_module(module).flash_attn_func
    except (ImportError, AttributeError):
        return None


_fa2_fn: Callable[..., object] | None = _import_kernel("flash_attn")
_fa3_fn: Callable[..., object] | None = _import_kernel("flash_attn_interface")


def _check_name(name: str, what: str = "attention backend") -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(BACKENDS)}")


_default_backend = os.environ.get("TM_ATTENTION_BACKEND", "auto")
_check_name(_default_backend, "TM_ATTENTION_BACKEND")
_default_backend = ALIASES.get(_default_backend, _default_backend)


def canonical(name: str) -> str:
    """The backend name without aliases (`flash` → `fa2`); ValueError for an unknown name."""
    _check_name(name)
    return ALIASES.get(name, name)


def set_attention_backend(name: str) -> None:
    """Set the process-wide default backend (one of BACKENDS) without checking the device."""
    global _default_backend
    _default_backend = canonical(name)


def get_attention_backend() -> str:
    """The process-wide default: a concrete backend, or `auto` when nothing resolved it."""
    return _default_backend


def flash_available() -> bool:
    """Whether flash-attn (FlashAttention-2) is importable."""
    return _fa2_fn is not None


def fa3_available() -> bool:
    """Whether FlashAttention-3 (`flash_attn_interface`) is importable."""
    return _fa3_fn is not None


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`; None for another device type, or where no GPU is visible
    (`--device cuda` on a host without one fails elsewhere, with its own message). Tests monkeypatch it."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _cudnn_sdpa_present() -> bool:
    return hasattr(torch.nn.attention, "SDPBackend") and hasattr(
        torch.nn.attention.SDPBackend, "CUDNN_ATTENTION"
    )


def unavailable_reason(
    name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> str | None:
    """Why backend `name` cannot serve a model of `dtype` and `head_dim` on `device`, or None if it can.

    Device-level checks only (installed, device type, compute capability, dtype, head dim); the per-call
    fallbacks (a mask, float32 inputs of a float32 island) are `attention`'s."""
    name = canonical(name)
    device = torch.device(device)
    if name in ("sdpa", "math", "auto"):
        return None
    if name in ("fa2", "fa3") and (_fa2_fn if name == "fa2" else _fa3_fn) is None:
        return _INSTALL_HINT[name]
    if name == "cudnn" and not _cudnn_sdpa_present():
        return f"this PyTorch ({torch.__version__}) has no SDPBackend.CUDNN_ATTENTION (PyTorch >= 2.5 has it)"
    if device.type not in KERNEL_DEVICE_TYPES:
        return f"it runs on CUDA only (device is {device.type!r})"
    if dtype not in KERNEL_DTYPES:
        return f"it takes float16/bfloat16 only (dtype is {dtype}; use --dtype bfloat16)"
    limit = MAX_HEAD_DIM
    capability = _capability(device)
    if capability is not None:
        cc = f"{capability[0]}.{capability[1]}"
        if name == "fa3" and capability[0] != 9:
            return f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x); this one is {cc}"
        if name in ("fa2", "cudnn") and capability < (8, 0):
            return f"it needs compute capability >= 8.0 (Ampere or newer); this GPU is {cc}"
        if name == "cudnn" and capability[0] < 9:
            limit = CUDNN_MAX_HEAD_DIM_PRE_HOPPER
    if head_dim % 8 or head_dim > limit:
        return f"it takes head dims that are multiples of 8 up to {limit}; the model's is {head_dim}"
    return None


def resolve_attention_backend(
    name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> str:
    """The concrete backend (one of KERNELS) that `name` means for a model of `dtype` and `head_dim` on
    `device`: `auto` → the first of AUTO_ORDER the device can run; a named backend → itself, or ValueError
    saying why it cannot run here and what to use instead."""
    name = canonical(name)
    if name == "auto":
        return next(k for k in AUTO_ORDER if unavailable_reason(k, device, dtype, head_dim) is None)
    reason = unavailable_reason(name, device, dtype, head_dim)
    if reason is not None:
        fallback = resolve_attention_backend("auto", device, dtype, head_dim)
        raise ValueError(
            f"--attention-backend {name} cannot run here: {reason}. Use --attention-backend auto (here: "
            f"{fallback}) or sdpa"
        )
    return name


def configure_attention_backend(
    name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> str:
    """Resolve `name` for this process's model (`resolve_attention_backend`, ValueError if it cannot run)
    and make it the process-wide default; returns the concrete backend. Called once per process at
    start-up."""
    backend = resolve_attention_backend(name, device, dtype, head_dim)
    set_attention_backend(backend)
    return backend


_auto_cache: dict[tuple[torch.device, torch.dtype, int], str] = {}


def _auto_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Unconfigured `auto` for a call's (device, dtype, head dim), resolved once per key."""
    if device.type not in KERNEL_DEVICE_TYPES:
        return "sdpa"
    key = (device, dtype, head_dim)
    if key not in _auto_cache:
        _auto_cache[key] = resolve_attention_backend("auto", device, dtype, head_dim)
    return _auto_cache[key]


def _kernel_takes(
    q: torch.Tensor, kv: tuple[torch.Tensor, ...], mask: torch.Tensor | None, limit: int
) -> bool:
    """Whether a flash/cuDNN kernel takes this call; otherwise it runs through SDPA (module docstring)."""
    d = q.shape[-1]
    return (
        mask is None
        and q.device.type in KERNEL_DEVICE_TYPES
        and q.dtype in KERNEL_DTYPES
        and all(t.dtype == q.dtype and t.shape[-1] == d for t in kv)
        and d % 8 == 0
        and d <= limit
    )


def resolve_backend(
    q: torch.Tensor,
    mask: torch.Tensor | None,
    backend: str | None = None,
    kv: tuple[torch.Tensor, ...] = (),
) -> str:
    """The backend a call with these inputs runs on: the named (or default) backend, or `sdpa` when its
    kernel cannot take the call (a mask, a dtype, head dim or device it does not support; `kv` are the
    call's keys and values, checked for q's dtype and head dim). RuntimeError if a named flash backend is
    not installed at all."""
    name = canonical(backend or _default_backend)
    if name == "auto":
        name = _auto_for(q.device, q.dtype, q.shape[-1])
    if name in ("sdpa", "math"):
        return name
    if name in ("fa2", "fa3") and (_fa2_fn if name == "fa2" else _fa3_fn) is None:
        raise RuntimeError(f"attention backend {name!r}: {_INSTALL_HINT[name]}; use 'sdpa'")
    if name == "cudnn" and not _cudnn_sdpa_present():
        raise RuntimeError(f"attention backend 'cudnn': PyTorch {torch.__version__} has no cuDNN SDPA")
    # cuDNN's lower head-dim limit below Hopper is checked once at start-up (`unavailable_reason`, for the
    # model's head dim, which every attention call of the model shares): no device query per call.
    return name if _kernel_takes(q, kv, mask, MAX_HEAD_DIM) else "sdpa"


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    context: contextlib.AbstractContextManager[object] | None = None,
) -> torch.Tensor:
    """SDPA in the `[B, L, H, D]` layout, under `context` (e.g. `sdpa_kernel`) when given."""
    with context if context is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention with scale 1/√D.

    q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`; `mask` is boolean, True = may attend, broadcastable to
    `[B, H, Lq, Lk]` (usually `[Lq, Lk]`). Returns `[B, Lq, H, D]` in q's dtype. `backend` overrides the
    process-wide default for this call; a call the backend's kernel cannot take runs through SDPA.
    """
    name = resolve_backend(q, mask, backend, (k, v))
    if name == "fa2":
        assert _fa2_fn is not None
        return _fa2_fn(q, k, v)  # type: ignore[return-value]
    if name == "fa3":
        assert _fa3_fn is not None
        out = _fa3_fn(q, k, v)
        # FA3 releases differ: some return (out, softmax_lse), newer ones out alone.
        return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]
    if name == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return _sdpa(q, k, v, None, sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
    if name == "sdpa":
        return _sdpa(q, k, v, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)

"""The one attention function every DiT attention call goes through, with selectable backends.

Layout is `[B, L, H, D]` for q, k and v (the layout the KV cache stores and that Ulysses sequence
parallelism re-shards), output `[B, Lq, H, D]`. Backends:

- `flash`: flash-attn (`flash_attn_func`) on CUDA with fp16/bf16 inputs and no mask;
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (any device, optional boolean mask);
- `math`: explicit softmax in float32, for tests and debugging.

`auto` (the default) picks flash when it is importable and applicable, else sdpa. The default can be set
with `set_attention_backend` or the environment variable `TM_ATTENTION_BACKEND`; a call can override it.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")

_flash_fn: Callable[..., torch.Tensor] | None
try:
    _flash_fn = importlib.import_module("flash_attn").flash_attn_func
except ImportError:
    _flash_fn = None

_default_backend = os.environ.get("TM_ATTENTION_BACKEND", "auto")
if _default_backend not in BACKENDS:
    raise ValueError(f"TM_ATTENTION_BACKEND={_default_backend!r} is not one of {BACKENDS}")


def set_attention_backend(name: str) -> None:
    """Set the process-wide default backend (one of BACKENDS)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _default_backend = name


def get_attention_backend() -> str:
    return _default_backend


def flash_available() -> bool:
    return _flash_fn is not None


def resolve_backend(q: torch.Tensor, mask: torch.Tensor | None, backend: str | None = None) -> str:
    """The concrete backend a call with these inputs will use."""
    name = backend or _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    flash_ok = (
        _flash_fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None
    )
    if name == "auto":
        return "flash" if flash_ok else "sdpa"
    if name == "flash" and not flash_ok:
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 inputs and no mask "
            f"(got device={q.device}, dtype={q.dtype}, mask={mask is not None}); use 'sdpa'"
        )
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention with scale 1/√D.

    q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`; `mask` is boolean, True = may attend, broadcastable to
    `[B, H, Lq, Lk]` (usually `[Lq, Lk]`). Returns `[B, Lq, H, D]` in q's dtype.
    """
    name = resolve_backend(q, mask, backend)
    if name == "flash":
        assert _flash_fn is not None
        return _flash_fn(q, k, v)
    if name == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)

"""Attention backends (workers/attention.py)."""

import pytest
import torch

from workers.attention import attention, flash_available, resolve_backend

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 10, 4, 16, generator=gen),
        torch.randn(2, 14, 4, 16, generator=gen),
        torch.randn(2, 14, 4, 16, generator=gen),
    )


def test_sdpa_and_math_backends_agree():
    q, k, v = _qkv()
    assert torch.allclose(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"), atol=1e-5)


def test_masked_attention_equals_attention_over_the_allowed_keys():
    q, k, v = _qkv()
    mask = torch.zeros(10, 14, dtype=torch.bool)
    mask[:, 3:9] = True
    for backend in ("sdpa", "math"):
        expected = attention(q, k[:, 3:9], v[:, 3:9], backend=backend)
        assert torch.allclose(attention(q, k, v, mask=mask, backend=backend), expected, atol=1e-6)


def test_auto_picks_sdpa_on_cpu():
    q, _, _ = _qkv()
    assert resolve_backend(q, None, "auto") == "sdpa"


def test_unknown_backend_is_rejected_with_valid_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'.*sdpa"):
        attention(q, k, v, backend="xformers")


@pytest.mark.skipif(flash_available() and torch.cuda.is_available(), reason="flash-attn usable here")
def test_forcing_flash_where_it_cannot_run_says_why():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="flash-attn installed, CUDA fp16/bf16"):
        attention(q, k, v, backend="flash")

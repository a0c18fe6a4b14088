"""Attention backends (workers/attention.py): results, `auto`'s resolution order, start-up refusals and the
per-call fallback to SDPA, with fake flash kernels standing in for the CUDA ones on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import workers.attention as attn
from workers.attention import (
    attention,
    configure_attention_backend,
    flash_available,
    resolve_attention_backend,
    resolve_backend,
)

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

HOPPER, AMPERE, TURING = (9, 0), (8, 6), (7, 5)


def _qkv(dtype: torch.dtype = torch.float32, head_dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, n, 4, head_dim, generator=gen).to(dtype) for n in (10, 14, 14))


def _reference(q, k, v, mask=None):
    """Softmax attention in float64 ([B, L, H, D] layout), independent of the module under test."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


class FakeKernel:
    """A flash_attn_func stand-in: reference attention (q's dtype); records (q's shape, the key count, dtype)
    of every call."""

    def __init__(self, returns_lse: bool = False) -> None:
        self.calls: list[tuple[tuple[int, ...], int, torch.dtype]] = []
        self.returns_lse = returns_lse

    def __call__(self, q, k, v):
        self.calls.append((tuple(q.shape), k.shape[1], q.dtype))
        out = _reference(q, k, v).to(q.dtype)
        return (out, torch.zeros(q.shape[:3])) if self.returns_lse else out


@pytest.fixture(autouse=True)
def _restore_default(monkeypatch):
    """Every test starts from `auto` with an empty resolution cache and leaves the module as it found it."""
    monkeypatch.setattr(attn, "_default_backend", "auto")
    monkeypatch.setattr(attn, "_auto_cache", {})


@pytest.fixture
def kernels(monkeypatch) -> Callable[..., dict[str, FakeKernel]]:
    """Install fake fa2/fa3 kernels, a fake compute capability, and let the kernels take CPU tensors."""

    def install(
        fa2: bool = True, fa3: bool = True, capability: tuple[int, int] = HOPPER, cpu: bool = False
    ) -> dict[str, FakeKernel]:
        fakes = {"fa2": FakeKernel(), "fa3": FakeKernel(returns_lse=True)}
        monkeypatch.setattr(attn, "_fa2_fn", fakes["fa2"] if fa2 else None)
        monkeypatch.setattr(attn, "_fa3_fn", fakes["fa3"] if fa3 else None)
        monkeypatch.setattr(attn, "_capability", lambda device: capability)
        if cpu:
            monkeypatch.setattr(attn, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
        return fakes

    return install


def test_sdpa_and_math_backends_agree():
    q, k, v = _qkv()
    want = _reference(q, k, v).float()
    for backend in ("sdpa", "math"):
        assert torch.allclose(attention(q, k, v, backend=backend), want, atol=1e-5)


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
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16, 128) == "sdpa"


def test_unknown_backend_is_rejected_with_valid_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'.*fa3.*cudnn.*sdpa"):
        attention(q, k, v, backend="xformers")


@pytest.mark.skipif(flash_available(), reason="flash-attn installed here")
def test_forcing_flash_where_it_is_not_installed_says_how_to_install_it():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"'fa2': flash-attn is not installed \(pip install flash-attn"):
        attention(q, k, v, backend="flash")


def test_auto_prefers_fa3_then_fa2_then_sdpa_and_never_picks_cudnn(kernels):
    kernels()
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 128) == "fa3"
    kernels(capability=AMPERE)  # FA3 is Hopper-only
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 128) == "fa2"
    kernels(fa3=False)
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 128) == "fa2"
    kernels(fa2=False, fa3=False)  # cuDNN is in every PyTorch >= 2.5, but opt-in
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 128) == "sdpa"
    kernels(capability=TURING)
    assert resolve_attention_backend("auto", "cuda", torch.float16, 128) == "sdpa"
    kernels()  # float32 model, or a head dim the kernels do not take: sdpa
    assert resolve_attention_backend("auto", "cuda", torch.float32, 128) == "sdpa"
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 264) == "sdpa"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16, 128) == "sdpa"
    assert resolve_attention_backend("cudnn", "cuda", torch.bfloat16, 128) == "cudnn"
    assert resolve_attention_backend("flash", "cuda", torch.bfloat16, 128) == "fa2"


@pytest.mark.parametrize(
    ("name", "device", "dtype", "head_dim", "capability", "installed", "message"),
    [
        ("fa3", "cuda", torch.bfloat16, 128, AMPERE, True, r"needs a Hopper GPU .*this one is 8\.6"),
        ("fa3", "cuda", torch.bfloat16, 128, HOPPER, False, r"FlashAttention-3 is not installed"),
        ("fa2", "cuda", torch.bfloat16, 128, HOPPER, False, r"flash-attn is not installed"),
        ("fa2", "cuda", torch.bfloat16, 128, TURING, True, r"compute capability >= 8\.0.*7\.5"),
        ("fa2", "cpu", torch.bfloat16, 128, HOPPER, True, r"runs on CUDA only \(device is 'cpu'\)"),
        ("cudnn", "cuda", torch.float32, 128, HOPPER, True, r"float16/bfloat16 only.*--dtype bfloat16"),
        ("fa3", "cuda", torch.bfloat16, 264, HOPPER, True, r"multiples of 8 up to 256; the model's is 264"),
        ("cudnn", "cuda", torch.bfloat16, 192, AMPERE, True, r"multiples of 8 up to 128; the model's is 192"),
    ],
)
def test_a_backend_the_device_cannot_run_is_refused_with_the_reason_and_the_fix(
    kernels, name, device, dtype, head_dim, capability, installed, message
):
    kernels(fa2=installed, fa3=installed, capability=capability)
    with pytest.raises(ValueError, match=rf"--attention-backend {name} cannot run here: .*{message}"):
        resolve_attention_backend(name, device, dtype, head_dim)
    with pytest.raises(ValueError, match=r"Use --attention-backend auto \(here: \w+\) or sdpa"):
        resolve_attention_backend(name, device, dtype, head_dim)


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_a_flash_kernel_runs_unmasked_calls_and_equals_sdpa(kernels, backend):
    fakes = kernels(cpu=True)
    q, k, v = _qkv(torch.bfloat16)
    out = attention(q, k, v, backend=backend)
    # the kernel ran (and FA3's (out, lse) was unpacked)
    assert fakes[backend].calls == [((2, 10, 4, 16), 14, torch.bfloat16)]
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # bf16 rounding of the output (8 bits of mantissa) bounds the difference to the float64 reference.
    assert torch.allclose(out.double(), _reference(q, k, v), atol=2e-2)


@pytest.mark.parametrize("backend", ["fa2", "fa3", "cudnn"])
def test_masks_dtypes_and_head_dims_a_kernel_cannot_take_fall_back_to_sdpa(kernels, backend):
    fakes = kernels(cpu=True)
    q, k, v = _qkv(torch.bfloat16)
    mask = torch.rand(10, 14, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    masked = attention(q, k, v, mask=mask, backend=backend)
    assert torch.equal(masked, attention(q, k, v, mask=mask, backend="sdpa"))
    assert torch.allclose(masked.double(), _reference(q, k, v, mask), atol=2e-2)
    q32, k32, v32 = _qkv(torch.float32)  # a float32 island of a bf16 model
    assert torch.equal(attention(q32, k32, v32, backend=backend), attention(q32, k32, v32, backend="sdpa"))
    wide = _qkv(torch.bfloat16, head_dim=264)
    assert torch.equal(attention(*wide, backend=backend), attention(*wide, backend="sdpa"))
    assert not fakes["fa2"].calls and not fakes["fa3"].calls
    assert resolve_backend(q, mask, backend) == "sdpa"
    assert resolve_backend(q, None, backend) == backend


def test_cudnn_keeps_sdpa_for_cpu_tensors():
    q, _, _ = _qkv(torch.bfloat16)
    assert resolve_backend(q, None, "cudnn") == "sdpa"


def test_configure_pins_the_process_default_and_every_dit_call_goes_through_it(kernels, monkeypatch):
    """A bf16 tiny DiT with fa2 configured: the streaming passes (no mask) run on the kernel; the
    full-sequence reference's masked self-attention falls back to SDPA, its unmasked cross-attention
    does not."""
    from proto.model_config import get_model_preset
    from proto.stream_config import StreamConfig
    from workers.factory import build_score_model
    from workers.streaming import StreamingDiT, full_sequence_denoise

    fakes = kernels(fa3=False, cpu=True)
    model = build_score_model("tiny", seed=0, dtype=torch.bfloat16)
    cfg = get_model_preset("tiny")
    assert configure_attention_backend("auto", "cuda", torch.bfloat16, cfg.head_dim) == "fa2"
    assert attn.get_attention_backend() == "fa2"
    stream = StreamConfig(height=32, width=32, denoising_steps=(1000,))
    engine = StreamingDiT(model, stream)
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(cfg.text_len, cfg.text_dim, generator=gen)
    noise = torch.randn(1, *stream.latent_shape(0), generator=gen)
    y = torch.randn(cfg.in_dim - cfg.out_dim, *stream.latent_shape(0)[1:], generator=gen)
    state = engine.open_session(context, torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=gen))
    engine.denoise_chunk(state, 0, noise=noise, y=y)
    tokens = stream.tokens_per_chunk
    self_attention = [c for c in fakes["fa2"].calls if c[0][1] == tokens and c[1] == tokens]
    # every block's cached self-attention of every pass ran on the kernel (chunk 0 sees its own tokens)
    assert len(self_attention) == cfg.num_layers * engine.passes_per_chunk
    assert any(c[1] == cfg.text_len for c in fakes["fa2"].calls)  # the text cross-attention too
    fakes["fa2"].calls.clear()
    spied: list[bool] = []
    sdpa = attn._sdpa

    def spy(q, k, v, mask, context=None):
        spied.append(mask is not None)
        return sdpa(q, k, v, mask, context)

    monkeypatch.setattr(attn, "_sdpa", spy)
    with torch.no_grad():
        full_sequence_denoise(model, stream, noise, state.cross_kv, y=y)
    assert spied.count(True) == cfg.num_layers  # the masked self-attention: SDPA with the mask (one step)
    assert all(c[1] != tokens for c in fakes["fa2"].calls)  # the kernel ran no self-attention...
    assert any(c[1] == cfg.text_len for c in fakes["fa2"].calls)  # ...but the unmasked cross-attention

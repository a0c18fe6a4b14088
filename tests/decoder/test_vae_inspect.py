"""`inspect --vae`: parameters, FLOPs per chunk and decode-cache memory, built on the meta device."""

from __future__ import annotations

import pytest
import torch

from decoder.inspect import describe_vae, main_inspect_vae
from decoder.streaming import DecodeSession
from decoder.vae import build_vae
from proto.vae_config import get_vae_preset


@pytest.fixture(scope="module")
def wan21() -> dict:
    return describe_vae("wan2.1", 512, 512)


def test_parameters_are_the_exact_wan21_count(wan21: dict) -> None:
    assert wan21["parameters"]["total"] == 126_892_531
    assert wan21["state_dict_tensors"] == 194


def test_decode_flops_at_512_match_the_reference_hook_count(wan21: dict) -> None:
    # reference/wan.md §3.5: 2.82 / 8.86 TFLOP per latent without the ~0.03 TFLOP of middle attention.
    flops = wan21["decode_flops"]
    assert flops["first_latent"] == pytest.approx(2.82e12 + 0.03e12, rel=0.01)
    assert flops["later_latent"] == pytest.approx(8.86e12 + 0.03e12, rel=0.01)
    assert flops["later_chunk"] == 3 * flops["later_latent"]
    assert wan21["frames_per_chunk"] == {"first": 9, "later": 12}


def test_decode_cache_at_512_has_wans_slot_layout(wan21: dict) -> None:
    # reference/wan.md §3.4: 32 slots of 2 frames: 16ch@64², 11x384ch@64², 192ch@128², 6x384ch@128²,
    # 6x192ch@256², 7x96ch@512².
    elements = 2 * (
        16 * 64**2 + 11 * 384 * 64**2 + 192 * 128**2 + 6 * 384 * 128**2 + 6 * 192 * 256**2 + 7 * 96 * 512**2
    )
    assert wan21["decode_cache"]["tensors"] == 32
    assert wan21["decode_cache"]["elements"] == elements
    assert wan21["decode_cache"]["bytes_bf16"] == 2 * elements


def test_cache_size_equals_a_real_sessions_cache() -> None:
    session = DecodeSession(build_vae(get_vae_preset("tiny")), 16, 24)
    session.decode_chunk(torch.randn(16, 3, 2, 3))
    assert describe_vae("tiny", 16, 24)["decode_cache"]["bytes_float32"] == session.cache_nbytes()


def test_text_report_states_parameters_flops_and_cache() -> None:
    text = main_inspect_vae("wan2.1")
    assert "126,892,531" in text
    assert "later chunk (12 frames) 26.64 TFLOP" in text
    assert "1.24 GB bf16" in text

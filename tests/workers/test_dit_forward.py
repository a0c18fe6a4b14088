"""WanModel forward on the tiny preset: shapes, conditioning contracts, per-frame timesteps, layout."""

import pytest
import torch

from proto.model_config import get_model_preset
from workers.model import WanModel

CFG = get_model_preset("tiny")


@pytest.fixture(scope="module")
def model() -> WanModel:
    torch.manual_seed(0)
    m = WanModel(CFG)
    m.init_weights(zero_head=False)
    return m.eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, 16, 3, 8, 8, generator=gen),
        "y": torch.randn(1, 20, 3, 8, 8, generator=gen),
        "context": torch.randn(1, 10, CFG.text_dim, generator=gen),
        "clip_fea": torch.randn(1, CFG.clip_tokens, CFG.clip_dim, generator=gen),
    }


@torch.no_grad()
def test_output_is_a_latent_shaped_velocity(model, inputs):
    out = model(
        inputs["x"],
        torch.tensor([500.0]),
        context=inputs["context"],
        clip_fea=inputs["clip_fea"],
        y=inputs["y"],
    )
    assert out.shape == (1, 16, 3, 8, 8)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and out.abs().max() > 0


@torch.no_grad()
def test_wan_initialisation_zeroes_the_output_head(inputs):
    fresh = WanModel(CFG)
    out = fresh(
        inputs["x"],
        torch.tensor([500.0]),
        context=inputs["context"],
        clip_fea=inputs["clip_fea"],
        y=inputs["y"],
    )
    assert torch.equal(out, torch.zeros_like(out))


@torch.no_grad()
def test_per_frame_timesteps_equal_to_the_shared_one_give_the_same_output(model, inputs):
    kw = {"context": inputs["context"], "clip_fea": inputs["clip_fea"], "y": inputs["y"]}
    shared = model(inputs["x"], torch.tensor([833.3]), **kw)
    per_frame = model(inputs["x"], torch.full((1, 3), 833.3), **kw)
    assert torch.equal(shared, per_frame)


@torch.no_grad()
def test_each_frame_is_modulated_by_its_own_timestep(model):
    _, e0_a = model.time_embed(torch.tensor([[0.0, 500.0, 1000.0]]))
    _, e0_b = model.time_embed(torch.tensor([[0.0, 500.0, 250.0]]))
    assert e0_a.shape == (1, 3, 6, CFG.dim) and e0_a.dtype == torch.float32
    assert torch.equal(e0_a[:, :2], e0_b[:, :2])
    assert not torch.allclose(e0_a[:, 2], e0_b[:, 2])


@torch.no_grad()
def test_precomputed_cross_attention_kv_equals_raw_context(model, inputs):
    kw = {"y": inputs["y"]}
    raw = model(
        inputs["x"], torch.tensor([500.0]), context=inputs["context"], clip_fea=inputs["clip_fea"], **kw
    )
    kv = model.cross_attention_kv(inputs["context"], inputs["clip_fea"])
    assert torch.equal(raw, model(inputs["x"], torch.tensor([500.0]), cross_kv=kv, **kw))


@torch.no_grad()
def test_short_text_is_zero_padded_to_text_len(model, inputs):
    padded = torch.nn.functional.pad(inputs["context"], (0, 0, 0, CFG.text_len - 10))
    assert torch.equal(model.embed_text(inputs["context"]), model.embed_text(padded))


def test_i2v_without_y_names_the_expected_shape(model, inputs):
    with pytest.raises(ValueError, match=r"needs y of shape \(1, 20, 3, 8, 8\)"):
        model(inputs["x"], torch.tensor([500.0]), context=inputs["context"], clip_fea=inputs["clip_fea"])


def test_too_long_text_is_rejected(model, inputs):
    with pytest.raises(ValueError, match="text context has shape"):
        model.embed_text(torch.randn(1, CFG.text_len + 1, CFG.text_dim))


def test_unpatchify_inverts_wans_token_layout(model):
    z = torch.randn(1, 16, 3, 8, 8)
    # Wan's token order: (f, h, w) row-major; inside a token (p_t, p_h, p_w, c), channel fastest.
    tokens = z.view(1, 16, 3, 4, 2, 4, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(1, 3 * 16, 4 * 16)
    assert torch.equal(model.unpatchify(tokens, 3, 4, 4), z)


@torch.no_grad()
def test_bfloat16_weights_run_with_float32_modulation(inputs):
    torch.manual_seed(0)
    m32 = WanModel(CFG)
    m32.init_weights(zero_head=False)
    m16 = WanModel(CFG).to(torch.bfloat16)
    m16.load_state_dict(m32.state_dict())
    kw = {"context": inputs["context"], "clip_fea": inputs["clip_fea"], "y": inputs["y"]}
    out32 = m32(inputs["x"], torch.tensor([500.0]), **kw)
    out16 = m16(inputs["x"], torch.tensor([500.0]), **kw)
    assert out16.dtype == torch.float32
    assert (out16 - out32).abs().max() < 0.1 * out32.abs().max()

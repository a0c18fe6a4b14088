"""frontends.wan_encoders: Wan 2.1's encoder files (the layout of a published Wan 2.1 / SoulX-LiveAct folder)
loaded onto our CLIP and umT5 compute what Wan's own modules compute.

The oracle is tests/fixtures/wan_encoders/, written by Wan's `wan/modules/clip.py` and `t5.py` at tiny sizes
(tests/oracles/make_wan_encoder_fixtures.py; upstream commit in wan_encoders.json): its `.pth` files are
Wan's state dicts, `wan_outputs.safetensors` Wan's inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from frontends.conditioning import ConditioningConfig, ConditioningEncoders, clean_prompt, tiny_clip_config
from frontends.wan_encoders import (
    WAN_CLIP_FILE,
    WAN_UMT5_FILE,
    WAN_UMT5_TOKENIZER,
    WanCheckpointError,
    clip_vision_from_wan,
    load_wan_state,
    umt5_encoder_from_wan,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wan_encoders"
MANIFEST = json.loads((FIXTURES / "wan_encoders.json").read_text())
CLIP_CFG, T5_CFG = MANIFEST["clip_config"], MANIFEST["t5_config"]
TOLERANCE = 1e-5  # float32; observed: CLIP 5e-7 from the uint8 image (0 from Wan's pixels), umT5 8e-7
CONFIG = ConditioningConfig(
    clip_dim=CLIP_CFG["vision_dim"],
    clip_tokens=1 + (CLIP_CFG["image_size"] // CLIP_CFG["patch_size"]) ** 2,
    text_dim=T5_CFG["dim"],
    text_len=MANIFEST["text_len"],
    clip_heads=CLIP_CFG["vision_heads"],
    clip_checkpoint=str(FIXTURES),  # the folder, as a published checkpoint folder is passed
    umt5_checkpoint=str(FIXTURES),
)


@pytest.fixture(scope="module")
def wan() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "wan_outputs.safetensors"))


@pytest.fixture(scope="module")
def encoders() -> ConditioningEncoders:
    torch.set_num_threads(1)
    return ConditioningEncoders.from_config(CONFIG)


def _images(wan: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [wan[f"image_{i}"].numpy() for i in range(wan["pixels"].shape[0])]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


# ---- equivalence with Wan's modules --------------------------------------------------------------------


@pytest.mark.equality
def test_clip_image_context_equals_wans_clip_visual(encoders, wan) -> None:
    """Image → context, our preprocessing included: what Wan's I2V pipeline gets from `clip.visual`."""
    for i, image in enumerate(_images(wan)):
        _assert_close(encoders.encode_image(image), wan["clip_context"][i])


@pytest.mark.equality
def test_clip_preprocessing_and_tower_each_equal_wans(encoders, wan) -> None:
    pixels = torch.cat([encoders.preprocess_image(image) for image in _images(wan)])
    _assert_close(pixels, wan["pixels"])
    with torch.no_grad():
        hidden = encoders.clip(pixel_values=wan["pixels"], output_hidden_states=True).hidden_states[-2]
    _assert_close(hidden, wan["clip_context"])


@pytest.mark.equality
def test_umt5_encoder_equals_wans_on_the_real_tokens(encoders, wan) -> None:
    with torch.no_grad():
        hidden = encoders.umt5(input_ids=wan["ids"], attention_mask=wan["mask"]).last_hidden_state
    real = wan["mask"].bool()
    _assert_close(hidden[real], wan["t5_hidden"][real])


@pytest.mark.equality
def test_prompt_context_equals_wans_text_encoder_call(encoders, wan) -> None:
    """Prompt → tokens (the sibling google/umt5-xxl tokenizer, Wan's whitespace and HTML cleaning) → context:
    Wan's T5EncoderModel(prompt), trimmed to the real tokens, then zero rows."""
    for i, prompt in enumerate(MANIFEST["prompts"]):
        ids, _ = encoders._tokenize(clean_prompt(prompt))
        assert ids[0].tolist() == wan["ids"][i].tolist()
        context, want = encoders.encode_prompt(prompt), wan[f"context_{i}"]
        _assert_close(context[: len(want)], want)
        assert not context[len(want) :].any()


@pytest.mark.equality
def test_the_files_themselves_load_as_the_folder_does(encoders, wan) -> None:
    by_file = ConditioningEncoders.from_config(
        dataclasses.replace(
            CONFIG,
            clip_checkpoint=str(FIXTURES / WAN_CLIP_FILE),
            umt5_checkpoint=str(FIXTURES / WAN_UMT5_FILE),
        )
    )
    image = _images(wan)[0]
    torch.testing.assert_close(by_file.encode_image(image), encoders.encode_image(image), atol=0, rtol=0)
    prompt = MANIFEST["prompts"][0]
    torch.testing.assert_close(by_file.encode_prompt(prompt), encoders.encode_prompt(prompt), atol=0, rtol=0)


def test_bfloat16_weights_are_the_memory_mapped_tensors_themselves(tmp_path: Path) -> None:
    """A bf16 file (as Wan publishes umT5) loaded in bf16 is not copied: every parameter is a view of the
    memory-mapped tensor; in another dtype each tensor is cast."""
    for name in (WAN_CLIP_FILE, WAN_UMT5_FILE):
        state = torch.load(FIXTURES / name, weights_only=True)
        torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / name)
    clip_state, umt5_state = (
        load_wan_state(tmp_path / WAN_CLIP_FILE),
        load_wan_state(tmp_path / WAN_UMT5_FILE),
    )
    clip = clip_vision_from_wan(clip_state, torch.bfloat16, num_heads=CLIP_CFG["vision_heads"])
    umt5 = umt5_encoder_from_wan(umt5_state, torch.bfloat16)
    storages = {t.untyped_storage().data_ptr() for t in (*clip_state.values(), *umt5_state.values())}
    params = [*clip.parameters(), *umt5.parameters()]
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.untyped_storage().data_ptr() for p in params} <= storages
    assert umt5.encoder.embed_tokens.weight is umt5.shared.weight  # tied: one tensor, not two
    as_float = umt5_encoder_from_wan(umt5_state, torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    torch.testing.assert_close(as_float.shared.weight, umt5_state["token_embedding.weight"].float())


def test_bfloat16_encoders_from_wan_files_stay_close_to_float32(encoders, wan) -> None:
    half = ConditioningEncoders.from_config(dataclasses.replace(CONFIG, dtype=torch.bfloat16))
    assert {p.dtype for p in (*half.clip.parameters(), *half.umt5.parameters())} == {torch.bfloat16}
    image, prompt = _images(wan)[1], MANIFEST["prompts"][1]
    pairs = (
        (half.encode_image(image), wan["clip_context"][1]),
        (half.encode_prompt(prompt), encoders.encode_prompt(prompt)),
    )
    for got, want in pairs:
        assert got.dtype == torch.float32
        assert (got - want).abs().max() <= 0.05 * want.abs().max()


# ---- the published sizes, on the meta device -----------------------------------------------------------


def _wan_clip_state(dim: int, layers: int, mlp: int, patch: int, positions: int, out: int) -> dict:
    """Wan's XLMRobertaCLIP visual keys and shapes (checked against the fixture below), on meta."""
    shapes = {
        "log_scale": (),
        "visual.cls_embedding": (1, 1, dim),
        "visual.pos_embedding": (1, positions, dim),
        "visual.head": (dim, out),
        "visual.patch_embedding.weight": (dim, 3, patch, patch),
        "visual.pre_norm.weight": (dim,),
        "visual.pre_norm.bias": (dim,),
        "visual.post_norm.weight": (dim,),
        "visual.post_norm.bias": (dim,),
    }
    for i in range(layers):
        block = {
            "norm1": (dim,),
            "attn.to_qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "norm2": (dim,),
            "mlp.0": (mlp, dim),
            "mlp.2": (dim, mlp),
        }
        for name, shape in block.items():
            shapes[f"visual.transformer.{i}.{name}.weight"] = shape
            shapes[f"visual.transformer.{i}.{name}.bias"] = shape[:1]
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _wan_umt5_state(vocab: int, dim: int, inner: int, ff: int, heads: int, buckets: int, layers: int) -> dict:
    shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        block = {
            "norm1": (dim,),
            "attn.q": (inner, dim),
            "attn.k": (inner, dim),
            "attn.v": (inner, dim),
            "attn.o": (dim, inner),
            "norm2": (dim,),
            "ffn.gate.0": (ff, dim),
            "ffn.fc1": (ff, dim),
            "ffn.fc2": (dim, ff),
            "pos_embedding.embedding": (buckets, heads),
        }
        shapes.update({f"blocks.{i}.{name}.weight": shape for name, shape in block.items()})
    return {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in shapes.items()}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_the_meta_layouts_below_are_wans_at_the_fixture_sizes() -> None:
    wan_clip = torch.load(FIXTURES / WAN_CLIP_FILE, weights_only=True)
    ours = _wan_clip_state(32, CLIP_CFG["vision_layers"], 128, 14, 5, CLIP_CFG["embed_dim"])
    assert _shapes(ours) == {k: v for k, v in _shapes(wan_clip).items() if not k.startswith("textual.")}
    wan_t5 = torch.load(FIXTURES / WAN_UMT5_FILE, weights_only=True)
    assert _shapes(_wan_umt5_state(64, 32, 48, 40, 4, 32, T5_CFG["encoder_layers"])) == _shapes(wan_t5)


def test_vit_h_14_builds_with_16_heads_at_224_px() -> None:
    clip = clip_vision_from_wan(_wan_clip_state(1280, 32, 5120, 14, 257, 1024), torch.float16)
    config = clip.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 32, 16)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (5120, 224, 14)
    assert clip.embeddings.position_ids.tolist() == [list(range(257))]
    encoders_config = ConditioningConfig(clip_dim=1280, text_dim=4096, text_len=512, clip_tokens=257)
    assert encoders_config.clip_image_size == config.image_size


def test_umt5_xxl_builds_from_the_shapes_at_11_gb_in_bf16() -> None:
    umt5 = umt5_encoder_from_wan(_wan_umt5_state(256384, 4096, 4096, 10240, 64, 32, 24), torch.bfloat16)
    config = umt5.config
    assert (config.d_model, config.d_kv, config.d_ff, config.num_heads) == (4096, 64, 10240, 64)
    assert (config.num_layers, config.relative_attention_num_buckets, config.vocab_size) == (24, 32, 256384)
    assert sum(p.numel() * p.element_size() for p in umt5.parameters()) == pytest.approx(11.36e9, rel=1e-3)


# ---- clear errors --------------------------------------------------------------------------------------


def _config(**fields) -> ConditioningConfig:
    return dataclasses.replace(CONFIG, **fields)


def test_the_umt5_file_given_as_clip_names_the_right_option() -> None:
    with pytest.raises(WanCheckpointError, match="is Wan's umT5 encoder file, not CLIP: pass it to --umt5"):
        ConditioningEncoders.from_config(_config(clip_checkpoint=str(FIXTURES / WAN_UMT5_FILE)))


def test_a_pth_of_neither_layout_names_expected_and_found_keys(tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    torch.save(CLIPVisionModel(tiny_clip_config(32, 28)).state_dict(), tmp_path / "hf_clip.pth")
    with pytest.raises(
        WanCheckpointError,
        match=r"not Wan's CLIP layout: missing visual\.patch_embedding\.weight, .*; "
        r"it holds embeddings\.class_embedding, .*\(\d+ keys\)",
    ):
        ConditioningEncoders.from_config(_config(clip_checkpoint=str(tmp_path / "hf_clip.pth")))
    with pytest.raises(WanCheckpointError, match=r"not Wan's umT5 layout: missing token_embedding\.weight"):
        ConditioningEncoders.from_config(_config(umt5_checkpoint=str(tmp_path / "hf_clip.pth")))


def test_a_mis_shaped_tensor_is_named_with_both_shapes(tmp_path: Path) -> None:
    state = torch.load(FIXTURES / WAN_CLIP_FILE, weights_only=True)
    state["visual.transformer.1.mlp.0.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / WAN_CLIP_FILE)
    with pytest.raises(
        WanCheckpointError,
        match=r"visual\.transformer\.1\.mlp\.0\.weight: \[64, 32\], expected \[128, 32\] "
        r"\(→ encoder\.layers\.1\.mlp\.fc1\.weight\)",
    ):
        ConditioningEncoders.from_config(_config(clip_checkpoint=str(tmp_path)))
    t5 = torch.load(FIXTURES / WAN_UMT5_FILE, weights_only=True)
    t5["blocks.1.attn.o.weight"] = torch.zeros(32, 32)
    torch.save(t5, tmp_path / "t5.pth")
    with pytest.raises(
        WanCheckpointError, match=r"blocks\.1\.attn\.o\.weight: \[32, 32\], expected \[32, 48\]"
    ):
        umt5_encoder_from_wan(load_wan_state(tmp_path / "t5.pth"))


def test_keys_outside_the_layout_are_named(tmp_path: Path) -> None:
    state = torch.load(FIXTURES / WAN_CLIP_FILE, weights_only=True)
    state["visual.patch_embedding.bias"] = torch.zeros(32)
    with pytest.raises(WanCheckpointError, match=r"does not have: visual\.patch_embedding\.bias"):
        clip_vision_from_wan(state, num_heads=2)
    t5 = torch.load(FIXTURES / WAN_UMT5_FILE, weights_only=True)
    t5["pos_embedding.embedding.weight"] = t5.pop("blocks.0.pos_embedding.embedding.weight")
    with pytest.raises(WanCheckpointError, match=r"shared relative-position bias \(shared_pos=True\)"):
        umt5_encoder_from_wan(t5)


def test_a_vit_of_another_width_needs_its_head_count() -> None:
    with pytest.raises(WanCheckpointError, match=r"width 32, not ViT-H/14's 1280.*clip_heads"):
        ConditioningEncoders.from_config(_config(clip_heads=None))


def test_a_umt5_file_without_its_tokenizer_names_the_folder_looked_for(tmp_path: Path, wan) -> None:
    shutil.copy(FIXTURES / WAN_UMT5_FILE, tmp_path / WAN_UMT5_FILE)
    expected = str(tmp_path / WAN_UMT5_TOKENIZER)
    with pytest.raises(FileNotFoundError, match=rf"'{expected}' is not a directory .*umt5_tokenizer"):
        ConditioningEncoders.from_config(_config(umt5_checkpoint=str(tmp_path / WAN_UMT5_FILE)))
    (tmp_path / WAN_UMT5_TOKENIZER).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds neither tokenizer\.json nor spiece\.model"):
        ConditioningEncoders.from_config(_config(umt5_checkpoint=str(tmp_path)))
    named = ConditioningEncoders.from_config(
        _config(umt5_checkpoint=str(tmp_path), umt5_tokenizer=str(FIXTURES / WAN_UMT5_TOKENIZER))
    )
    want = wan["context_0"]
    _assert_close(named.encode_prompt(MANIFEST["prompts"][0])[: len(want)], want)


def test_a_missing_file_or_a_folder_of_neither_kind_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"'[^']*nope\.pth' is not a directory — pass a local Hugging"
    ):
        ConditioningEncoders.from_config(_config(clip_checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match=rf"holds no config\.json — .*Wan's {WAN_UMT5_FILE}"):
        ConditioningEncoders.from_config(_config(umt5_checkpoint=str(tmp_path)))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WanCheckpointError, match="holds a Tensor, not a state dict of tensors"):
        ConditioningEncoders.from_config(_config(clip_checkpoint=str(tmp_path / "tensor.pth")))


def test_the_fixture_records_its_upstream_commit_and_stays_small() -> None:
    assert len(MANIFEST["upstream_commit"]) == 40
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 2_000_000

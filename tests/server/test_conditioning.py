"""frontends.conditioning: tiny CLIP visual tower, tiny umT5 with the byte tokenizer, precomputed
embeddings."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from frontends.conditioning import (
    CLIP_MEAN,
    CLIP_STD,
    ByteTokenizer,
    ConditioningConfig,
    ConditioningEncoders,
    clean_prompt,
    load_image_embedding,
    load_prompt_embedding,
    tiny_clip_config,
)
from proto.model_config import get_model_preset

CONFIG = ConditioningConfig(clip_dim=32, text_dim=24, text_len=16)


@pytest.fixture(scope="module")
def encoders() -> ConditioningEncoders:
    torch.set_num_threads(1)
    return ConditioningEncoders.from_config(CONFIG)


def _image(h: int = 300, w: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_context_is_257_tokens_of_clip_dim(encoders: ConditioningEncoders) -> None:
    assert encoders.encode_image(_image()).shape == (257, 32)


def test_image_context_is_the_output_of_all_but_the_last_block_without_post_norm(
    encoders: ConditioningEncoders,
) -> None:
    truncated = copy.deepcopy(encoders.clip)
    encoder = truncated.encoder  # transformers 5 layout: CLIPVisionModel holds the tower's modules directly
    encoder.layers = encoder.layers[:-1]
    with torch.no_grad():
        expected = truncated(pixel_values=encoders.preprocess_image(_image())).last_hidden_state[0]
    torch.testing.assert_close(encoders.encode_image(_image()), expected)


def test_preprocessing_at_clip_size_is_plain_clip_normalisation(encoders: ConditioningEncoders) -> None:
    image = _image(224, 224)
    pixels = encoders.preprocess_image(image)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(pixels[0], expected, atol=1e-5, rtol=0)


def test_tiny_preset_shapes_follow_the_model_config() -> None:
    preset = get_model_preset("tiny")
    encoders = ConditioningEncoders.from_config(ConditioningConfig.for_model(preset))
    assert encoders.encode_image(_image()).shape == (preset.clip_tokens, preset.clip_dim)
    assert encoders.encode_prompt("hello").shape == (preset.text_len, preset.text_dim)


def test_prompt_context_has_zero_rows_after_the_real_tokens(encoders: ConditioningEncoders) -> None:
    context = encoders.encode_prompt("hi")  # 2 bytes + </s> = 3 tokens
    assert context.shape == (16, 24)
    assert context[:3].abs().sum(dim=1).min() > 0
    assert not context[3:].any()


def test_prompt_rows_do_not_depend_on_the_padding_length(encoders: ConditioningEncoders) -> None:
    longer = ConditioningEncoders(
        ConditioningConfig(clip_dim=32, text_dim=24, text_len=40),
        encoders.clip,
        encoders.umt5,
        ByteTokenizer(),
    )
    torch.testing.assert_close(
        longer.encode_prompt("a talking face")[:16], encoders.encode_prompt("a talking face")
    )


def test_whitespace_is_cleaned_as_wan_does(encoders: ConditioningEncoders) -> None:
    torch.testing.assert_close(encoders.encode_prompt("  a \n face "), encoders.encode_prompt("a face"))


def test_html_entities_are_unescaped_twice_as_wan_does(encoders: ConditioningEncoders) -> None:
    assert clean_prompt(" a &amp;amp; b &lt;3 ") == "a & b <3"
    torch.testing.assert_close(encoders.encode_prompt("a &amp; face"), encoders.encode_prompt("a & face"))


def test_byte_tokenizer_truncates_but_keeps_the_end_token() -> None:
    ids, mask = ByteTokenizer()("abcdef", max_length=4)
    assert ids.tolist() == [[ord("a") + 3, ord("b") + 3, ord("c") + 3, ByteTokenizer.eos_id]]
    assert mask.tolist() == [[1, 1, 1, 1]]


def test_local_checkpoint_with_the_wrong_width_is_rejected(tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    CLIPVisionModel(tiny_clip_config(16, 224)).save_pretrained(tmp_path / "clip")
    with pytest.raises(
        ValueError, match="CLIP checkpoint has hidden size 16, the model preset expects clip_dim=32"
    ):
        ConditioningEncoders.from_config(
            ConditioningConfig(clip_dim=32, text_dim=24, text_len=16, clip_checkpoint=str(tmp_path / "clip"))
        )


def test_local_clip_checkpoint_loads_and_encodes(tmp_path: Path, encoders: ConditioningEncoders) -> None:
    encoders.clip.save_pretrained(tmp_path / "clip")
    loaded = ConditioningEncoders.from_config(
        ConditioningConfig(clip_dim=32, text_dim=24, text_len=16, clip_checkpoint=str(tmp_path / "clip"))
    )
    torch.testing.assert_close(loaded.encode_image(_image()), encoders.encode_image(_image()))


def test_precomputed_image_embedding_is_accepted_with_or_without_batch(tmp_path: Path) -> None:
    embedding = torch.randn(1, 257, 32)
    torch.save(embedding, tmp_path / "clip.pt")
    torch.testing.assert_close(load_image_embedding(tmp_path / "clip.pt", CONFIG), embedding[0])


def test_precomputed_image_embedding_with_wrong_shape_is_rejected(tmp_path: Path) -> None:
    save_file({"clip": torch.randn(257, 1280)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \[257, 1280\], the model preset expects \[257, 32\]"):
        load_image_embedding(tmp_path / "clip.safetensors", CONFIG)


def test_precomputed_prompt_embedding_is_zero_padded_to_text_len(tmp_path: Path) -> None:
    embedding = torch.randn(5, 24)
    save_file({"context": embedding}, str(tmp_path / "text.safetensors"))
    padded = load_prompt_embedding(tmp_path / "text.safetensors", CONFIG)
    assert padded.shape == (16, 24)
    torch.testing.assert_close(padded[:5], embedding)
    assert not padded[5:].any()


def test_precomputed_prompt_embedding_longer_than_text_len_is_rejected(tmp_path: Path) -> None:
    torch.save({"context": torch.randn(17, 24)}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match=r"has shape \[17, 24\], the model preset expects \[L <= 16, 24\]"):
        load_prompt_embedding(tmp_path / "text.pt", CONFIG)


def test_precomputed_file_with_several_tensors_needs_a_key(tmp_path: Path) -> None:
    torch.save({"a": torch.randn(3, 24), "b": torch.randn(3, 24)}, tmp_path / "text.pt")
    with pytest.raises(KeyError, match=r"holds keys \['a', 'b'\]"):
        load_prompt_embedding(tmp_path / "text.pt", CONFIG)
    assert load_prompt_embedding(tmp_path / "text.pt", CONFIG, key="b").shape == (16, 24)

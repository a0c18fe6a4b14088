"""Exact parameter counts of the presets, built on the meta device (no memory allocated)."""

import torch

from proto.model_config import get_model_preset
from workers.model import WanModel, count_parameters


def _meta_model(name: str) -> WanModel:
    with torch.device("meta"):
        return WanModel(get_model_preset(name))


def test_wan_t2v_1_3b_has_exactly_wans_parameter_count():
    model = _meta_model("wan2.1-t2v-1.3b")
    assert count_parameters(model) == 1_418_996_800
    assert len(model.state_dict()) == 825


def test_wan_i2v_14b_has_exactly_wans_parameter_count():
    model = _meta_model("wan2.1-i2v-14b")
    assert count_parameters(model) == 16_394_878_784
    assert len(model.state_dict()) == 1303


def test_talkingmachines_18b_audio_projection_is_about_1_2b():
    model = _meta_model("talkingmachines-18b")
    assert count_parameters(model.audio_proj) == 1_208_283_648
    # Per block: k_audio + v_audio (768 → 5120, with bias) + norm_k_audio (5120).
    per_block_audio = 2 * (768 * 5120 + 5120) + 5120
    assert count_parameters(model) == 16_394_878_784 + 1_208_283_648 + 40 * per_block_audio
    assert count_parameters(model) == 17_918_349_632


def test_audio_layer_key_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in _meta_model("talkingmachines-18b").state_dict().items()}
    assert shapes["blocks.0.cross_attn.k_audio.weight"] == (5120, 768)
    assert shapes["blocks.39.cross_attn.v_audio.bias"] == (5120,)
    assert shapes["blocks.7.cross_attn.norm_k_audio.weight"] == (5120,)
    assert shapes["audio_proj.proj.0.weight"] == (5632, 5 * 4 * 12 * 768)
    assert shapes["audio_proj.proj.4.weight"] == (32 * 768, 5632)
    assert shapes["audio_proj.norm.weight"] == (768,)
    assert shapes["audio_proj.silence"] == (32, 768)

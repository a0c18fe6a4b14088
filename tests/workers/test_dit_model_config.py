"""Model presets and their validation (proto/model_config.py)."""

import dataclasses

import pytest

from proto.model_config import PRESETS, AudioConfig, ModelConfig, get_model_preset, model_preset_names


def test_presets_are_the_six_named_ones():
    assert model_preset_names() == [
        "soulx-liveact",
        "soulx-liveact-tiny",
        "talkingmachines-18b",
        "tiny",
        "wan2.1-i2v-14b",
        "wan2.1-t2v-1.3b",
    ]


def test_unknown_preset_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model preset 'wan3'.*tiny.*wan2\.1-i2v-14b"):
        get_model_preset("wan3")


def test_rope_split_matches_wan_for_head_dim_128():
    assert get_model_preset("wan2.1-i2v-14b").rope_pairs == (22, 21, 21)


def test_rope_split_covers_every_pair_for_tiny_heads():
    cfg = get_model_preset("tiny")
    assert cfg.head_dim == 32
    assert cfg.rope_pairs == (6, 5, 5)
    assert sum(cfg.rope_pairs) == cfg.head_dim // 2


def test_audio_variants_of_the_presets():
    variants = {name: cfg.audio_variant for name, cfg in PRESETS.items()}
    assert variants == {
        "soulx-liveact": "infinitetalk",
        "soulx-liveact-tiny": "infinitetalk",
        "talkingmachines-18b": "talkingmachines",
        "tiny": "talkingmachines",
        "wan2.1-i2v-14b": None,
        "wan2.1-t2v-1.3b": None,
    }
    assert {name for name, cfg in PRESETS.items() if cfg.memory is not None} == {
        "soulx-liveact",
        "soulx-liveact-tiny",
    }


def test_talkingmachines_is_i2v_14b_plus_audio():
    tm = get_model_preset("talkingmachines-18b")
    base = get_model_preset("wan2.1-i2v-14b")
    assert dataclasses.replace(tm, name=base.name, audio=None) == base


def test_dim_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match="dim=100 is not divisible by num_heads=3"):
        ModelConfig(name="bad", dim=100, num_heads=3)


def test_i2v_with_wrong_input_channels_is_rejected():
    with pytest.raises(ValueError, match=r"in_dim=16 .* = 36"):
        ModelConfig(name="bad", model_type="i2v", in_dim=16)


def test_audio_window_must_be_odd():
    with pytest.raises(ValueError, match="window must be a positive odd int"):
        AudioConfig(window=4)


def test_configs_are_frozen():
    cfg = get_model_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3  # type: ignore[misc]

"""The Wan presets' state dicts (meta device) equal the reference key tables of wan.md §1.4.

The expected dicts are written out from the reference tables, key family by key family, so a renamed
module, a missing bias or a transposed shape in workers/model.py fails here before any checkpoint is read.
Audio layers are TalkingMachines additions and are excluded from the comparison.
"""

from __future__ import annotations

import torch

from proto.model_config import get_model_preset
from workers.checkpoint import is_audio_key
from workers.model import WanModel


def _reference_keys(dim: int, ffn: int, layers: int, in_dim: int, i2v: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape, transcribed from wan.md §1.4 (T2V: no k_img/v_img/norm_k_img/img_emb)."""
    d, f = dim, ffn
    keys: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, in_dim, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (64, d),
        "head.head.bias": (64,),
    }
    for i in range(layers):
        b = f"blocks.{i}"
        keys[f"{b}.modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                keys[f"{b}.{attn}.{proj}.weight"] = (d, d)
                keys[f"{b}.{attn}.{proj}.bias"] = (d,)
            keys[f"{b}.{attn}.norm_q.weight"] = (d,)
            keys[f"{b}.{attn}.norm_k.weight"] = (d,)
        keys[f"{b}.norm3.weight"] = (d,)
        keys[f"{b}.norm3.bias"] = (d,)
        if i2v:
            for proj in ("k_img", "v_img"):
                keys[f"{b}.cross_attn.{proj}.weight"] = (d, d)
                keys[f"{b}.cross_attn.{proj}.bias"] = (d,)
            keys[f"{b}.cross_attn.norm_k_img.weight"] = (d,)
        keys[f"{b}.ffn.0.weight"] = (f, d)
        keys[f"{b}.ffn.0.bias"] = (f,)
        keys[f"{b}.ffn.2.weight"] = (d, f)
        keys[f"{b}.ffn.2.bias"] = (d,)
    if i2v:
        keys.update(
            {
                "img_emb.proj.0.weight": (1280,),
                "img_emb.proj.0.bias": (1280,),
                "img_emb.proj.1.weight": (1280, 1280),
                "img_emb.proj.1.bias": (1280,),
                "img_emb.proj.3.weight": (d, 1280),
                "img_emb.proj.3.bias": (d,),
                "img_emb.proj.4.weight": (d,),
                "img_emb.proj.4.bias": (d,),
            }
        )
    return keys


def _wan_state_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = WanModel(get_model_preset(preset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_audio_key(k)}


def test_i2v_14b_state_dict_equals_wan_reference_keys_and_shapes() -> None:
    expected = _reference_keys(dim=5120, ffn=13824, layers=40, in_dim=36, i2v=True)
    assert len(expected) == 1303
    assert _wan_state_shapes("wan2.1-i2v-14b") == expected


def test_t2v_1_3b_state_dict_equals_wan_reference_keys_and_shapes() -> None:
    expected = _reference_keys(dim=1536, ffn=8960, layers=30, in_dim=16, i2v=False)
    assert len(expected) == 825
    assert _wan_state_shapes("wan2.1-t2v-1.3b") == expected


def test_talkingmachines_18b_is_i2v_14b_plus_audio_keys_only() -> None:
    with torch.device("meta"):
        model = WanModel(get_model_preset("talkingmachines-18b"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wan = {k: s for k, s in shapes.items() if not is_audio_key(k)}
    assert wan == _reference_keys(dim=5120, ffn=13824, layers=40, in_dim=36, i2v=True)
    assert len(shapes) > len(wan)

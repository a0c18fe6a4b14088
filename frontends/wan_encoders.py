"""Wan 2.1's own encoder files onto our Hugging Face encoders.

A published Wan 2.1 I2V / SoulX-LiveAct checkpoint folder holds its conditioning encoders in Wan's module
layouts, not as Hugging Face folders:

- `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: Wan's `XLMRobertaCLIP` state dict
  (`wan/modules/clip.py`): a ViT-H/14 visual tower (`visual.*`) and an XLM-RoBERTa text tower
  (`textual.*`). I2V uses the visual tower only, up to its penultimate block (`use_31_block`);
- `models_t5_umt5-xxl-enc-bf16.pth`: Wan's `T5Encoder` state dict (`wan/modules/t5.py`), umT5-XXL's encoder
  in bf16 (about 11 GB);
- `google/umt5-xxl/`: the umT5 tokenizer (and `xlm-roberta-large/`, the CLIP text tokenizer, unused here).

`load_wan_clip_vision` / `load_wan_umt5_encoder` rename those tensors onto `CLIPVisionModel` /
`UMT5EncoderModel`, whose configurations come from the tensors' shapes (CLIP's head count, which no tensor
shows, is ViT-H/14's 16 unless given), so that our encoders compute what Wan's modules compute
(tests/server/test_wan_encoders.py, against fixtures written by Wan's own code). The files are read with
`torch.load(mmap=True, weights_only=True)`, the models built on the meta device and every tensor assigned
(`load_state_dict(assign=True)`) after a per-tensor cast: in the file's dtype the model's weights are the
memory-mapped tensors themselves, never a second copy.

Key mapping (Wan → Hugging Face), CLIP, `visual.` prefix dropped:
`patch_embedding` → `embeddings.patch_embedding`; `cls_embedding [1, 1, D]` → `embeddings.class_embedding
[D]`; `pos_embedding [1, P, D]` → `embeddings.position_embedding.weight [P, D]`; `pre_norm` →
`pre_layrnorm`; `transformer.i.norm1 / norm2` → `encoder.layers.i.layer_norm1 / layer_norm2`;
`transformer.i.attn.to_qkv [3D, D]` → `self_attn.q_proj / k_proj / v_proj` (thirds, in that order);
`transformer.i.attn.proj` → `self_attn.out_proj`; `transformer.i.mlp.0 / mlp.2` → `mlp.fc1 / fc2`;
`post_norm` → `post_layernorm`; `visual.head` (the joint-embedding projection), `textual.*` and `log_scale`
are not loaded.
umT5: `token_embedding` → `shared` (tied to `encoder.embed_tokens`); `blocks.i.norm1` →
`encoder.block.i.layer.0.layer_norm`; `blocks.i.attn.q/k/v/o` → `…layer.0.SelfAttention.q/k/v/o`;
`blocks.i.pos_embedding.embedding` → `…layer.0.SelfAttention.relative_attention_bias`; `blocks.i.norm2` →
`…layer.1.layer_norm`; `blocks.i.ffn.gate.0 / fc1 / fc2` → `…layer.1.DenseReluDense.wi_0 / wi_1 / wo`
(Wan: `fc1(x) * gelu_tanh(gate(x))`; Hugging Face: `gelu_new(wi_0(x)) * wi_1(x)`); `norm` →
`encoder.final_layer_norm`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN_UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_UMT5_TOKENIZER = "google/umt5-xxl"
VIT_H_14_HEADS = 16
"""Attention heads of Wan's ViT-H/14 (width 1280, head size 80); the tensors do not show the count."""
_TORCH_SUFFIXES = (".pth", ".pt")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_SHOWN_KEYS = 6

# Keys every Wan file of that kind holds (first block only): how a file's layout is recognised.
CLIP_MARKERS = (
    "visual.patch_embedding.weight",
    "visual.cls_embedding",
    "visual.pos_embedding",
    "visual.transformer.0.attn.to_qkv.weight",
)
UMT5_MARKERS = (
    "token_embedding.weight",
    "blocks.0.attn.q.weight",
    "blocks.0.pos_embedding.embedding.weight",
    "norm.weight",
)
_LAYOUTS = {"CLIP": (CLIP_MARKERS, "--clip-checkpoint"), "umT5": (UMT5_MARKERS, "--umt5-checkpoint")}


class WanCheckpointError(ValueError):
    """A Wan-format encoder file that cannot be read onto our encoder: another layout, mis-shaped tensors."""


def find_wan_file(path: str | Path, wan_name: str) -> Path | None:
    """The Wan-format file that a `--clip-checkpoint` / `--umt5-checkpoint` value names: the path itself when
    it is a `.pth` / `.pt` file, `<path>/<wan_name>` when that folder holds Wan's file (a published
    checkpoint folder), else None (a Hugging Face model folder, or nothing)."""
    path = Path(path)
    if path.is_file() and path.suffix in _TORCH_SUFFIXES:
        return path
    if path.is_dir() and (path / wan_name).is_file():
        return path / wan_name
    return None


def load_wan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A Wan state dict, memory-mapped (`torch.load(mmap=True, weights_only=True)`): nothing is read yet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Wan encoder file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise WanCheckpointError(
            f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors (Wan's encoder files "
            "are plain torch.save'd state dicts)"
        )
    return dict(state)


def _shown(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys)} keys)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def check_layout(state: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Raise WanCheckpointError unless `state` holds Wan's `what` layout ('CLIP' or 'umT5'), naming expected
    and found keys, and the right option when it is the other encoder's file."""
    markers, _ = _LAYOUTS[what]
    missing = [key for key in markers if key not in state]
    if not missing:
        return
    for other, (other_markers, flag) in _LAYOUTS.items():
        if other != what and all(key in state for key in other_markers):
            raise WanCheckpointError(f"{source} is Wan's {other} encoder file, not {what}: pass it to {flag}")
    if what == "umT5" and "pos_embedding.embedding.weight" in state:
        raise WanCheckpointError(
            f"{source} is a Wan T5 encoder with one shared relative-position bias (shared_pos=True): a T5, "
            "not umT5 (one bias per block); only umT5 is supported"
        )
    raise WanCheckpointError(
        f"{source} is not Wan's {what} layout: missing {', '.join(missing)}; it holds {_shown(state)}"
    )


def _blocks(state: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    """Number of blocks `<prefix><i>.` in `state`, checked to run 0..n-1."""
    found = {int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    if found != set(range(len(found))):
        raise WanCheckpointError(f"{source}: blocks {prefix}* are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _assign(
    model: torch.nn.Module,
    tensors: Mapping[str, tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    source: str,
    tied: Mapping[str, str] | None = None,
) -> None:
    """Assign `tensors` (HF key → (Wan key, tensor)) into `model` (built on the meta device), each cast to
    `dtype` one at a time; every parameter must be given (bar `tied` ones: HF key → the key it equals)."""
    tied = dict(tied or {})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:  # a mapping bug: the configuration comes from the same tensors
        raise WanCheckpointError(f"{source}: no tensor for {_shown(missing)}; no place for {_shown(extra)}")
    wrong = [
        f"{wan_key}: {list(tensor.shape)}, expected {list(expected[key])} (→ {key})"
        for key, (wan_key, tensor) in tensors.items()
        if tuple(tensor.shape) != expected[key]
    ]
    if wrong:
        more = f"; … ({len(wrong)} tensors)" if len(wrong) > _SHOWN_KEYS else ""
        listed = "; ".join(wrong[:_SHOWN_KEYS]) + more
        raise WanCheckpointError(
            f"{source}: tensor shapes disagree with the model that its embeddings and first block describe: "
            f"{listed}"
        )
    model.load_state_dict({k: t.to(dtype) for k, (_, t) in tensors.items()}, strict=False, assign=True)
    for key, source_key in tied.items():
        module_name, _, name = key.rpartition(".")
        setattr(model.get_submodule(module_name), name, model.get_parameter(source_key))


# ---- CLIP -------------------------------------------------------------------------------------------------


def wan_clip_vision_config(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None, source: str = "CLIP file"
) -> CLIPVisionConfig:
    """`CLIPVisionConfig` of a Wan CLIP state dict's visual tower, from its tensors' shapes. `num_heads`:
    the tensors do not show it; None means ViT-H/14's 16, for width 1280 only."""
    check_layout(state, "CLIP", source)
    patch = state["visual.patch_embedding.weight"]
    width = patch.shape[0]
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise WanCheckpointError(
            f"{source}: visual.patch_embedding.weight is {list(patch.shape)}, not [D, 3, p, p]"
        )
    positions = state["visual.pos_embedding"].shape[-2]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise WanCheckpointError(
            f"{source}: visual.pos_embedding has {positions} positions, not 1 + a square number of patches "
            "(a 'token'-pooled ViT: 257 = 1 + 16x16)"
        )
    if num_heads is None:
        if width != 1280:
            raise WanCheckpointError(
                f"{source}: a ViT of width {width}, not ViT-H/14's 1280; its head count is not in the file: "
                "give it (ConditioningConfig.clip_heads)"
            )
        num_heads = VIT_H_14_HEADS
    if width % num_heads:
        raise WanCheckpointError(f"{source}: width {width} does not split into {num_heads} heads")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state["visual.transformer.0.mlp.0.weight"].shape[0],
        num_hidden_layers=_blocks(state, "visual.transformer.", source),
        num_attention_heads=num_heads,
        image_size=side * patch.shape[-1],
        patch_size=patch.shape[-1],
        hidden_act="gelu",  # Wan's clip_xlm_roberta_vit_h_14: activation='gelu' (exact), norm_eps 1e-5
        layer_norm_eps=1e-5,
    )


_CLIP_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_CLIP_TOP_NAMES = {"pre_norm": "pre_layrnorm", "post_norm": "post_layernorm"}
_CLIP_BLOCK_KEY = re.compile(r"transformer\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.0|mlp\.2)\.(weight|bias)")
_CLIP_SKIPPED = re.compile(r"^(textual\.|log_scale$|visual\.head(\.|$))")


def wan_clip_vision_tensors(
    state: Mapping[str, torch.Tensor], source: str = "CLIP file"
) -> dict[str, tuple[str, torch.Tensor]]:
    """The visual tower's tensors under `CLIPVisionModel` keys: HF key → (Wan key, tensor), views of
    `state`'s (no copy). Any `visual.*` key the mapping does not know is an error."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for wan_key, tensor in state.items():
        if _CLIP_SKIPPED.match(wan_key):
            continue
        key = wan_key.removeprefix("visual.")
        if key == "patch_embedding.weight":
            out["embeddings.patch_embedding.weight"] = (wan_key, tensor)
        elif key == "cls_embedding":
            out["embeddings.class_embedding"] = (wan_key, tensor.reshape(tensor.shape[-1]))
        elif key == "pos_embedding":
            out["embeddings.position_embedding.weight"] = (wan_key, tensor.reshape(tensor.shape[-2:]))
        elif (m := re.fullmatch(r"(pre_norm|post_norm)\.(weight|bias)", key)) is not None:
            out[f"{_CLIP_TOP_NAMES[m.group(1)]}.{m.group(2)}"] = (wan_key, tensor)
        elif (m := re.fullmatch(r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", key)) is not None:
            if tensor.shape[0] % 3:
                raise WanCheckpointError(f"{source}: {wan_key} is {list(tensor.shape)}, not [3 x D, ...]")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = (wan_key, part)
        elif (m := _CLIP_BLOCK_KEY.fullmatch(key)) is not None:
            name = f"encoder.layers.{m.group(1)}.{_CLIP_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
            out[name] = (wan_key, tensor)
        else:
            unknown.append(wan_key)
    if unknown:
        raise WanCheckpointError(
            f"{source}: keys that Wan's token-pooled, pre-norm ViT does not have: {_shown(unknown)}"
        )
    return out


def clip_vision_from_wan(
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    num_heads: int | None = None,
    source: str = "CLIP file",
) -> CLIPVisionModel:
    """`CLIPVisionModel` (eval) holding a Wan CLIP state dict's visual tower in `dtype`."""
    config = wan_clip_vision_config(state, num_heads, source)
    tensors = wan_clip_vision_tensors(state, source)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    _assign(model, tensors, dtype, source)
    _rebuild_position_ids(model)
    return model.eval()


def _rebuild_position_ids(model: torch.nn.Module) -> None:
    """Non-persistent `position_ids` buffers (0..n-1) were built on the meta device: make them real."""
    for module in model.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            real = torch.arange(ids.shape[-1]).expand(ids.shape)
            module.register_buffer("position_ids", real, persistent=False)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left}")


def load_wan_clip_vision(
    path: str | Path, dtype: torch.dtype = torch.float32, num_heads: int | None = None
) -> CLIPVisionModel:
    """`CLIPVisionModel` from Wan's CLIP file (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`)."""
    return clip_vision_from_wan(load_wan_state(path), dtype, num_heads, source=f"CLIP file {str(path)!r}")


# ---- umT5 -------------------------------------------------------------------------------------------------


def wan_umt5_config(state: Mapping[str, torch.Tensor], source: str = "umT5 file") -> UMT5Config:
    """`UMT5Config` of a Wan T5Encoder state dict (per-block relative-position biases), from its shapes."""
    check_layout(state, "umT5", source)
    vocab, width = state["token_embedding.weight"].shape
    inner = state["blocks.0.attn.q.weight"].shape[0]
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    if inner % heads:
        raise WanCheckpointError(f"{source}: attention width {inner} does not split into {heads} heads")
    return UMT5Config(
        vocab_size=vocab,
        d_model=width,
        d_kv=inner // heads,
        d_ff=state["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=_blocks(state, "blocks.", source),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # Wan's T5RelativeEmbedding max_dist
        feed_forward_proj="gated-gelu",  # gelu_new, the tanh form Wan's GELU computes
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


_UMT5_BLOCK_NAMES: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    **{f"attn.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_umt5_tensors(
    state: Mapping[str, torch.Tensor], source: str = "umT5 file"
) -> dict[str, tuple[str, torch.Tensor]]:
    """The encoder's tensors under `UMT5EncoderModel` keys: HF key → (Wan key, tensor), `state`'s own."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for wan_key, tensor in state.items():
        if wan_key == "token_embedding.weight":
            out["shared.weight"] = (wan_key, tensor)
        elif wan_key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = (wan_key, tensor)
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", wan_key)) and m.group(2) in _UMT5_BLOCK_NAMES:
            out[f"encoder.block.{m.group(1)}.{_UMT5_BLOCK_NAMES[m.group(2)]}"] = (wan_key, tensor)
        else:
            unknown.append(wan_key)
    if unknown:
        raise WanCheckpointError(f"{source}: keys that Wan's umT5 encoder does not have: {_shown(unknown)}")
    return out


def umt5_encoder_from_wan(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32, source: str = "umT5 file"
) -> UMT5EncoderModel:
    """`UMT5EncoderModel` (eval) holding a Wan T5Encoder state dict in `dtype`."""
    config = wan_umt5_config(state, source)
    tensors = wan_umt5_tensors(state, source)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _assign(model, tensors, dtype, source, tied={"encoder.embed_tokens.weight": "shared.weight"})
    return model.eval()


def load_wan_umt5_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """`UMT5EncoderModel` from Wan's encoder file (`models_t5_umt5-xxl-enc-bf16.pth`)."""
    return umt5_encoder_from_wan(load_wan_state(path), dtype, source=f"umT5 file {str(path)!r}")


def wan_umt5_tokenizer_dir(wan_file: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The umT5 tokenizer folder for Wan's encoder file (which holds none): `tokenizer` when given, else
    Wan's `google/umt5-xxl/` beside the file (the published folder's layout)."""
    folder = Path(tokenizer) if tokenizer is not None else Path(wan_file).parent / WAN_UMT5_TOKENIZER
    how = "the umT5 tokenizer given" if tokenizer is not None else f"Wan's tokenizer folder beside {wan_file}"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{how}: {str(folder)!r} is not a directory — Wan's umT5 file holds no tokenizer; keep "
            f"{WAN_UMT5_TOKENIZER}/ from the same download beside it, or name the folder "
            "(ConditioningConfig.umt5_tokenizer)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{how}: {str(folder)!r} holds neither {' nor '.join(_TOKENIZER_FILES)}")
    return folder

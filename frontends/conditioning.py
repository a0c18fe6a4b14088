"""Per-session conditioning encoders: the reference image through CLIP's visual tower and the prompt through
umT5, as Wan 2.1 I2V builds its image and text contexts (reference/wan.md §2.3-2.4).

- Image: `[clip_tokens, clip_dim]` = 1 CLS + patch tokens, the hidden state after all but the last
  transformer block (Wan's `use_31_block=True`: `hidden_states[-2]`, no post-norm, no projection).
  ViT-H/14 at 224 px gives `[257, 1280]`.
- Prompt: `[text_len, text_dim]`, the umT5 encoder output of the real tokens followed by zero rows
  (Wan trims to the real length and the DiT pads back with zeros; the same tensor).

Either encoder is a local Hugging Face checkpoint (`CLIPVisionModel` / `UMT5EncoderModel`, nothing is
downloaded), Wan's own encoder file as a published Wan 2.1 / SoulX-LiveAct folder holds it (converted onto
the same modules at load time: `frontends.wan_encoders`), or, by default, a tiny random model whose widths
are the model preset's `clip_dim` / `text_dim`.
The tiny text encoder uses `ByteTokenizer`, self-contained. Precomputed embeddings (.pt / .safetensors) can
replace either encoder (`load_image_embedding`, `load_prompt_embedding`).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from frontends.wan_encoders import (
    WAN_CLIP_FILE,
    WAN_UMT5_FILE,
    check_layout,
    find_wan_file,
    load_wan_clip_vision,
    load_wan_state,
    umt5_encoder_from_wan,
    wan_umt5_tokenizer_dir,
)
from proto.model_config import ModelConfig

# OpenAI CLIP normalisation, used by Wan's CLIP preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PATCH = 14


@dataclass(frozen=True)
class ConditioningConfig:
    """Shapes and sources of the session encoders.

    clip_tokens: 1 + (image_size / 14)^2; 257 for ViT-H/14 at 224 px (the `tiny` preset uses 17: 56 px).
    clip_checkpoint / umt5_checkpoint: a local Hugging Face folder; Wan's encoder file (`.pth`), or a folder
        holding it under Wan's name (a published Wan 2.1 / SoulX-LiveAct checkpoint folder); None builds
        the tiny random encoder (seed `tiny_seed`).
    umt5_tokenizer: the umT5 tokenizer folder (tokenizer.json or spiece.model); None: the umT5 folder itself,
        or for Wan's file the `google/umt5-xxl/` folder beside it.
    clip_heads: attention heads of a Wan CLIP file's ViT, which its tensors do not show; None: ViT-H/14's 16.
    dtype: the encoders' weights and compute (`--dtype`); their outputs are float32 whatever it is.
    """

    clip_dim: int
    text_dim: int
    text_len: int
    clip_tokens: int = 257
    clip_checkpoint: str | None = None
    umt5_checkpoint: str | None = None
    umt5_tokenizer: str | None = None
    clip_heads: int | None = None
    tiny_seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("clip_dim", "text_dim", "text_len", "clip_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ConditioningConfig.{name} must be positive, got {getattr(self, name)}")
        side = math.isqrt(self.clip_tokens - 1)
        if side * side != self.clip_tokens - 1:
            raise ValueError(
                f"clip_tokens={self.clip_tokens} is not 1 + a square number of patches (257 = 1 + 16x16)"
            )

    @property
    def clip_image_size(self) -> int:
        """Pixels of the square CLIP input: 14 per patch (224 for 257 tokens)."""
        return CLIP_PATCH * math.isqrt(self.clip_tokens - 1)

    @classmethod
    def for_model(cls, model: ModelConfig, **overrides: Any) -> ConditioningConfig:
        """Shapes from a model preset (`clip_dim`, `clip_tokens`, `text_dim`, `text_len`)."""
        fields: dict[str, Any] = {
            "clip_dim": model.clip_dim,
            "clip_tokens": model.clip_tokens,
            "text_dim": model.text_dim,
            "text_len": model.text_len,
        }
        fields.update(overrides)
        return cls(**fields)


class ByteTokenizer:
    """Self-contained tokenizer for the tiny umT5: UTF-8 bytes shifted past T5's special ids.

    ids: 0 = pad, 1 = </s> (appended, as umT5's tokenizer does), 2 = unk (unused), byte b → b + 3.
    """

    pad_id = 0
    eos_id = 1
    vocab_size = 256 + 3

    def __call__(self, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`text` → (ids `[1, max_length]` int64, attention mask `[1, max_length]` int64); truncation keeps
        the closing </s>, as Hugging Face tokenizers do."""
        ids = [*(b + 3 for b in text.encode("utf-8")[: max_length - 1]), self.eos_id]
        out = torch.full((1, max_length), self.pad_id, dtype=torch.long)
        out[0, : len(ids)] = torch.tensor(ids)
        mask = torch.zeros((1, max_length), dtype=torch.long)
        mask[0, : len(ids)] = 1
        return out, mask


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: HTML entities unescaped (twice, as Wan), runs of whitespace become one
    space, ends trimmed. Wan first runs `ftfy.fix_text` too (mojibake, curly quotes to straight ones, …),
    which is not a dependency here: prompts that it would change tokenize differently."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def tiny_clip_config(clip_dim: int, image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=clip_dim,
        intermediate_size=4 * clip_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=CLIP_PATCH,
        hidden_act="gelu",
    )


def tiny_umt5_config(text_dim: int) -> UMT5Config:
    return UMT5Config(
        vocab_size=ByteTokenizer.vocab_size,
        d_model=text_dim,
        d_kv=max(text_dim // 2, 1),
        d_ff=2 * text_dim,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=ByteTokenizer.pad_id,
        eos_token_id=ByteTokenizer.eos_id,
    )


def _checkpoint_dir(path: str, what: str, wan_name: str) -> Path:
    """A Hugging Face model folder (`path` is neither Wan's file nor a folder holding it)."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        problem = "is not a directory" if not folder.is_dir() else "holds no config.json"
        raise FileNotFoundError(
            f"{what} checkpoint {path!r} {problem} — pass a local Hugging Face model folder, Wan's "
            f"{wan_name} (or the folder holding it), or none for the tiny random encoder"
        )
    return folder


def _load_clip(config: ConditioningConfig, path: str) -> CLIPVisionModel:
    wan_file = find_wan_file(path, WAN_CLIP_FILE)
    if wan_file is not None:
        return load_wan_clip_vision(wan_file, config.dtype, config.clip_heads)
    folder = _checkpoint_dir(path, "CLIP", WAN_CLIP_FILE)
    return CLIPVisionModel.from_pretrained(str(folder), local_files_only=True)


def _load_umt5(config: ConditioningConfig, path: str) -> tuple[UMT5EncoderModel, Any]:
    """The encoder and its tokenizer. A Wan file's layout is checked first (memory-mapped: nothing read yet),
    then its tokenizer is found, and only then are 11 GB converted."""
    wan_file = find_wan_file(path, WAN_UMT5_FILE)
    if wan_file is None:
        folder = _checkpoint_dir(path, "umT5", WAN_UMT5_FILE)
        tokenizer_dir = Path(config.umt5_tokenizer) if config.umt5_tokenizer is not None else folder
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        return UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True), tokenizer
    source = f"umT5 file {str(wan_file)!r}"
    state = load_wan_state(wan_file)
    check_layout(state, "umT5", source)
    tokenizer_dir = wan_umt5_tokenizer_dir(wan_file, config.umt5_tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return umt5_encoder_from_wan(state, config.dtype, source), tokenizer


class ConditioningEncoders:
    """The CLIP visual tower and the umT5 text encoder of one serving group (eval mode, in `config.dtype`;
    they return float32)."""

    def __init__(
        self, config: ConditioningConfig, clip: CLIPVisionModel, umt5: UMT5EncoderModel, tokenizer: Any
    ) -> None:
        self.config = config
        self.clip = clip
        self.umt5 = umt5
        self.tokenizer = tokenizer
        if clip.config.hidden_size != config.clip_dim:
            raise ValueError(
                f"CLIP checkpoint has hidden size {clip.config.hidden_size}, the model preset expects "
                f"clip_dim={config.clip_dim} — wrong checkpoint or preset?"
            )
        if clip.config.image_size != config.clip_image_size or clip.config.patch_size != CLIP_PATCH:
            raise ValueError(
                f"CLIP checkpoint takes {clip.config.image_size} px with patch {clip.config.patch_size}, "
                f"the preset expects {config.clip_tokens} tokens "
                f"({config.clip_image_size} px, patch {CLIP_PATCH})"
            )
        if umt5.config.d_model != config.text_dim:
            raise ValueError(
                f"umT5 checkpoint has d_model {umt5.config.d_model}, the model preset expects "
                f"text_dim={config.text_dim} — wrong checkpoint or preset?"
            )

    @classmethod
    def from_config(cls, config: ConditioningConfig) -> ConditioningEncoders:
        """Load the local checkpoints named in `config` (Wan's files in `config.dtype`, tensor by tensor), or
        build the tiny random encoders."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.tiny_seed)
            if config.clip_checkpoint is None:
                clip = CLIPVisionModel(tiny_clip_config(config.clip_dim, config.clip_image_size))
            else:
                clip = _load_clip(config, config.clip_checkpoint)
            if config.umt5_checkpoint is None:
                umt5 = UMT5EncoderModel(tiny_umt5_config(config.text_dim))
                tokenizer: Any = ByteTokenizer()
            else:
                umt5, tokenizer = _load_umt5(config, config.umt5_checkpoint)
        # Random tiny weights are drawn in float32 (above), then cast: the same model in every dtype.
        to = {"device": config.device, "dtype": config.dtype}
        return cls(config, clip.to(**to).eval(), umt5.to(**to).eval(), tokenizer)

    def preprocess_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 `[H, W, 3]` RGB → CLIP pixels `[1, 3, S, S]` float32, exactly as Wan: map to [-1, 1],
        bicubic resize (squash, no crop; align_corners=False), back to [0, 1], CLIP mean/std."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"reference image must be uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}"
            )
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
        x = x.sub(0.5).div(0.5)
        size = self.config.clip_image_size
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """Reference image uint8 `[H, W, 3]` → CLIP context `[clip_tokens, clip_dim]` float32 (CPU)."""
        pixels = self.preprocess_image(image).to(self.config.device, self.config.dtype)
        hidden = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[-2][0].float().cpu()

    def _tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(text, self.config.text_len)
        batch = self.tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.config.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt → text context `[text_len, text_dim]` float32 (CPU); rows past the real tokens are zero."""
        ids, mask = self._tokenize(clean_prompt(prompt))
        device = self.config.device
        hidden = self.umt5(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state[0]
        hidden = hidden.float().cpu()
        return hidden * mask[0, :, None].to(hidden.dtype)


def _load_tensor(path: str | Path, key: str | None) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"precomputed embedding {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        loaded: Any = load_file(str(path))
    elif path.suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"precomputed embedding {str(path)!r}: expected a .pt, .pth or .safetensors file")
    if isinstance(loaded, torch.Tensor):
        return loaded
    if not isinstance(loaded, dict):
        raise ValueError(f"precomputed embedding {str(path)!r} holds a {type(loaded).__name__}, not tensors")
    if key is None and len(loaded) == 1:
        return next(iter(loaded.values()))
    if key not in loaded:
        raise KeyError(
            f"precomputed embedding {str(path)!r} holds keys {sorted(loaded)}; name the one to use "
            f"(got key={key!r})"
        )
    return loaded[key]


def _drop_batch(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[0] if tensor.ndim == 3 and tensor.shape[0] == 1 else tensor


def load_image_embedding(
    path: str | Path, config: ConditioningConfig, key: str | None = None
) -> torch.Tensor:
    """Precomputed CLIP context `[clip_tokens, clip_dim]` (or `[1, ...]`) → float32, same shape."""
    tensor = _drop_batch(_load_tensor(path, key))
    expected = (config.clip_tokens, config.clip_dim)
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"precomputed image embedding {str(path)!r} has shape {list(tensor.shape)}, the model preset "
            f"expects {list(expected)} (CLIP tokens x clip_dim) — wrong preset or file?"
        )
    return tensor.float()


def load_prompt_embedding(
    path: str | Path, config: ConditioningConfig, key: str | None = None
) -> torch.Tensor:
    """Precomputed umT5 context `[L, text_dim]` with L <= text_len (or `[1, ...]`) → float32
    `[text_len, text_dim]` zero-padded, as `encode_prompt` returns."""
    tensor = _drop_batch(_load_tensor(path, key))
    if tensor.ndim != 2 or tensor.shape[1] != config.text_dim or tensor.shape[0] > config.text_len:
        raise ValueError(
            f"precomputed prompt embedding {str(path)!r} has shape {list(tensor.shape)}, the model preset "
            f"expects [L <= {config.text_len}, {config.text_dim}] (tokens x text_dim) — wrong preset or file?"
        )
    return F.pad(tensor.float(), (0, 0, 0, config.text_len - tensor.shape[0]))

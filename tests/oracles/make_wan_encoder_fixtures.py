"""Write tests/fixtures/wan_encoders/ from Wan 2.1's own encoder modules: the oracle of
tests/server/test_wan_encoders.py, which checks that `frontends.wan_encoders` loads Wan's encoder files onto
our Hugging Face modules and computes what Wan computes.

Wan's `wan/modules/clip.py` (XLM-RoBERTa CLIP, of which I2V uses the ViT's `use_31_block` output) and
`wan/modules/t5.py` (the umT5 encoder) are built at tiny sizes with seeded random weights (layer norms
randomised too, so that a mixed-up norm shows). Written, in the layout of a published Wan 2.1 / SoulX-LiveAct
checkpoint folder:

- `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: the whole XLMRobertaCLIP state dict (visual
  and text towers, as Wan publishes it), float32;
- `models_t5_umt5-xxl-enc-bf16.pth`: the T5Encoder state dict, float32 (the published file is bf16; the
  name is kept so that the folder lookup is exercised);
- `google/umt5-xxl/`: a tiny word-level tokenizer (ours, not upstream's: the real one is 4 MB), loaded by
  Wan's `HuggingfaceTokenizer` here and by our loader in the test;
- `wan_outputs.safetensors`: the inputs and Wan's outputs: `image_*` (uint8 [H, W, 3]), `pixels` (what
  `CLIPModel.visual` hands its ViT after its own resize and normalisation), `clip_context` (its return
  value, as Wan's I2V pipeline calls it: `clip.visual([img[:, None]])` with `img` = to_tensor(image) in
  [-1, 1]), `ids` / `mask` (the tokenizer's), `t5_hidden` (the encoder on them, every position) and
  `context_<i>` (`T5EncoderModel.__call__(prompt)`: trimmed to the real tokens);
- `wan_encoders.json`: the upstream commit, the tiny configurations, the prompts, and how this was run.

CUDA-only bits are shimmed here, nothing else: `flash_attention` (CLIP's attention; a CUDA kernel that also
runs in bf16) becomes float32 scaled-dot-product attention, `torch.cuda.current_device()` (evaluated when
t5.py is imported) returns "cpu", and `wan/__init__.py` is skipped (it imports the whole pipeline).

Run it against an upstream checkout of SoulX-LiveAct (which carries Wan 2.1's modules), with the upstream-only
packages in a separate folder (never in the project's venv):

    git -C <SoulX-LiveAct clone> archive HEAD wan | tar -x -C /tmp/up-wan
    .venv/bin/python -m pip install --target /tmp/up-deps --no-deps torchvision==0.29.2 ftfy==6.3.1 wcwidth
    PYTHONPATH=/tmp/up-deps .venv/bin/python tests/oracles/make_wan_encoder_fixtures.py \\
        --upstream /tmp/up-wan --commit "$(git -C <SoulX-LiveAct clone> rev-parse HEAD)"
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wan_encoders"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"

# XLMRobertaCLIP at a tiny size: ViT of width 32, 2 heads, 3 blocks (use_31_block runs 2), 28 px with 14 px
# patches (5 tokens); a one-block text tower, present in the file as in Wan's, unused by I2V.
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "image_size": 28,
    "patch_size": 14,
    "vision_dim": 32,
    "vision_mlp_ratio": 4,
    "vision_heads": 2,
    "vision_layers": 3,
    "vision_pool": "token",
    "activation": "gelu",
    "vocab_size": 40,
    "max_text_len": 12,
    "type_size": 1,
    "pad_id": 1,
    "text_dim": 16,
    "text_heads": 2,
    "text_layers": 1,
    "text_post_norm": True,
    "text_dropout": 0.1,
    "attn_dropout": 0.0,
    "proj_dropout": 0.0,
    "embedding_dropout": 0.0,
}
# umT5 at a tiny size: per-block relative position biases (shared_pos=False, as umt5_xxl), an attention width
# (48 = 4 heads x 12) unlike the model width (32), 32 buckets as the real one.
T5_CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "dim": 32,
    "dim_attn": 48,
    "dim_ffn": 40,
    "num_heads": 4,
    "encoder_layers": 2,
    "decoder_layers": 0,
    "num_buckets": 32,
    "shared_pos": False,
    "dropout": 0.1,
}
TEXT_LEN = 24  # past the 8 exact relative-position buckets: the logarithmic ones are used too
WORDS = (
    "a person is talking to the camera and smiling while the light falls on her face in a quiet room "
    "he nods slowly & looks at us with calm eyes"
).split()
PROMPTS = (
    "  a person is talking\n to the camera &amp; smiling ",  # Wan's clean: whitespace and HTML entities
    " ".join([*WORDS[:20], "zebra", *WORDS[20:]]),  # longer than TEXT_LEN (truncated), an unknown word
)
IMAGE_SHAPES = ((20, 24), (50, 37))  # up- and down-sampled to 28 px by the bicubic resize


def import_wan(upstream: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """wan.modules.clip and wan.modules.t5 from an upstream checkout, without wan/__init__.py."""
    for name, folder in (("wan", upstream / "wan"), ("wan.modules", upstream / "wan" / "modules")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # T5EncoderModel's default argument, evaluated at import
    try:
        clip = importlib.import_module("wan.modules.clip")
        t5 = importlib.import_module("wan.modules.t5")
    finally:
        torch.cuda.current_device = current_device
    clip.flash_attention = _attention
    return clip, t5


def _attention(q, k, v, dropout_p=0.0, causal=False, **_: Any) -> torch.Tensor:
    """flash_attention's contract ([B, L, N, C] in and out, softmax scale 1/sqrt(C)) in float32."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal
    )
    return out.transpose(1, 2).contiguous()


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=generator))


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with T5's special ids (0 pad, 1 </s> appended, 2 unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= T5_CONFIG["vocab_size"], len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(str(folder))


def build_clip(clip: types.ModuleType) -> Any:
    """Wan's CLIPModel around a tiny XLMRobertaCLIP (its __init__ would build ViT-H and load a file)."""
    torch.manual_seed(1)
    model, transforms = clip._clip(
        False,
        "open-clip-xlm-roberta-large-vit-huge-14",
        clip.XLMRobertaCLIP,
        return_transforms=True,
        dtype=torch.float32,
        device="cpu",
        **CLIP_CONFIG,
    )
    _randomise_norms(model, torch.Generator().manual_seed(2))
    wrapper = object.__new__(clip.CLIPModel)
    wrapper.dtype, wrapper.device = torch.float32, "cpu"
    wrapper.model, wrapper.transforms = model.eval().requires_grad_(False), transforms
    return wrapper


def build_t5(t5: types.ModuleType, tokenizer_dir: Path) -> Any:
    """Wan's T5EncoderModel around a tiny T5Encoder and the tiny tokenizer."""
    torch.manual_seed(3)
    model = t5._t5("umt5-xxl", encoder_only=True, dtype=torch.float32, device="cpu", **T5_CONFIG)
    _randomise_norms(model, torch.Generator().manual_seed(4))
    tokenizers = importlib.import_module("wan.modules.tokenizers")
    wrapper = object.__new__(t5.T5EncoderModel)
    wrapper.text_len, wrapper.dtype, wrapper.device = TEXT_LEN, torch.float32, "cpu"
    wrapper.model = model.eval().requires_grad_(False)
    wrapper.tokenizer = tokenizers.HuggingfaceTokenizer(
        name=str(tokenizer_dir), seq_len=TEXT_LEN, clean="whitespace"
    )
    return wrapper


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", type=Path, required=True, help="folder holding Wan's wan/ package")
    parser.add_argument("--commit", required=True, help="the upstream commit the modules come from")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip, t5 = import_wan(args.upstream)
    import torchvision.transforms.functional as TF

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.out / TOKENIZER_DIR
    write_tokenizer(tokenizer_dir)
    tensors: dict[str, torch.Tensor] = {}

    # CLIP: what Wan's I2V pipeline does with the reference image (wan/image2video.py).
    clip_model = build_clip(clip)
    torch.save(clip_model.model.state_dict(), args.out / CLIP_FILE)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SHAPES]
    seen: list[torch.Tensor] = []
    visual = clip_model.model.visual
    hook = visual.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].clone()))
    context = clip_model.visual([TF.to_tensor(image).sub_(0.5).div_(0.5)[:, None] for image in images])
    hook.remove()
    for i, image in enumerate(images):
        tensors[f"image_{i}"] = torch.from_numpy(image)
    tensors["pixels"], tensors["clip_context"] = seen[0], context.float()

    # umT5: Wan's T5EncoderModel.__call__ per prompt, and the encoder on the padded ids.
    t5_model = build_t5(t5, tokenizer_dir)
    torch.save(t5_model.model.state_dict(), args.out / T5_FILE)
    ids, mask = t5_model.tokenizer(list(PROMPTS), return_mask=True, add_special_tokens=True)
    tensors["ids"], tensors["mask"] = ids, mask
    tensors["t5_hidden"] = t5_model.model(ids, mask)
    for i, prompt in enumerate(PROMPTS):
        tensors[f"context_{i}"] = t5_model(texts=prompt, device="cpu")[0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "wan_outputs.safetensors"))

    manifest = {
        "upstream": "Soul-AILab/SoulX-LiveAct (Wan 2.1's wan/modules/clip.py, t5.py, tokenizers.py)",
        "upstream_commit": args.commit,
        "written_by": "tests/oracles/make_wan_encoder_fixtures.py",
        "torch": torch.__version__,
        "clip_file": CLIP_FILE,
        "clip_config": CLIP_CONFIG,
        "t5_file": T5_FILE,
        "t5_config": T5_CONFIG,
        "text_len": TEXT_LEN,
        "prompts": list(PROMPTS),
        "dtype": "float32",
        "shims": "flash_attention -> float32 scaled_dot_product_attention; "
        "torch.cuda.current_device -> 'cpu'",
    }
    (args.out / "wan_encoders.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out}: {total / 1e3:.0f} kB")
    for name, tensor in tensors.items():
        print(f"  {name}: {list(tensor.shape)} {tensor.dtype}")


if __name__ == "__main__":
    main()

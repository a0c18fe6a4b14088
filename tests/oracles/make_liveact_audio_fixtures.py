"""Writes tests/fixtures/liveact_audio/ by running upstream's own audio code (SoulX-LiveAct, InfiniteTalk).

tests/frontends/test_infinitetalk_audio.py compares frontends.infinitetalk_audio with what this saves; CI
never runs this script. It runs, unmodified, upstream's code:

- SoulX-LiveAct: `src/audio_analysis/wav2vec2.py` (its Wav2Vec2Model subclass, which interpolates the CNN
  features to the video frame count), `util_liveact.get_embedding` and `get_audio_emb`, and the
  `resample_audio` function nested in generate.py's main (taken out of the file with `ast`): SoX
  `tempo 25/fps`, torchaudio's Resample to 16 kHz, times 3.0;
- InfiniteTalk: its wav2vec2.py subclass and generate_infinitetalk.py's `loudness_norm` (pyloudnorm,
  -23 LUFS) and `get_embedding` (taken out with `ast`, the module itself imports the whole video stack).

Stand-ins, because torchaudio (2.8, with SoX bindings) cannot be installed beside this project's torch:
`torchaudio.sox_effects.apply_effects_tensor` runs the same libsox effect through the `sox` program
(32-bit float WAV in and out, `-D`: no dither), and `torchaudio.transforms.Resample(16000, 16000)` returns
its input as torchaudio's does (the clip is 16 kHz, so no other rate occurs). Upstream LiveAct loads
wav2vec2 in bfloat16 on the GPU; here both run float32 on the CPU. InfiniteTalk's wav2vec2 is loaded with
`attn_implementation="eager"` (its forward asks for attention maps, which SDPA cannot give in transformers
4.57). InfiniteTalk's `audio_prepare_single` reads the file with librosa (float32 at 16 kHz, unchanged for
this 16 kHz clip): the clip is passed directly to `loudness_norm`.

The wav2vec2 is a tiny random one (seeded, real CNN geometry, 2 layers of width 32) saved with
`save_pretrained` in the TencentGameMate/chinese-wav2vec2-base layout (config.json, model.safetensors,
preprocessor_config.json with do_normalize) under wav2vec2/, so the test also loads a checkpoint folder.

Run (about a minute on 2 cores):

    L=/work/.mirror/Soul-AILab+SoulX-LiveAct/repo I=/work/.mirror/MeiGen-AI+InfiniteTalk/repo
    mkdir -p /tmp/up-l /tmp/up-i
    git -C $L archive HEAD src util_liveact.py generate.py | tar -x -C /tmp/up-l
    git -C $I archive HEAD src/audio_analysis generate_infinitetalk.py | tar -x -C /tmp/up-i
    apt-get install -y sox
    # upstream's subclass needs transformers 4.x (5.x no longer returns hidden states from the encoder call)
    .venv/bin/pip install --target /tmp/oracle-deps --no-deps transformers==4.57.1 huggingface_hub==0.36.0 \
        tokenizers==0.22.1 einops pyloudnorm scipy
    PYTHONPATH=/tmp/oracle-deps .venv/bin/python tests/oracles/make_liveact_audio_fixtures.py \
        --liveact /tmp/up-l --infinitetalk /tmp/up-i --liveact-commit $(git -C $L rev-parse HEAD) \
        --infinitetalk-commit $(git -C $I rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 41_000  # stretched at fps 24 / 20 the clip is not a multiple of 640 samples: the
# interpolation then has fractional weights; at fps 25 (no stretch) it is 40 above one.
FPS = (24, 20, 25)
ITERATIONS = {24: (0, 2), 20: (0,), 25: ()}  # get_audio_emb ranges saved per fps
SEED = 0


def speech_like_clip() -> np.ndarray:
    """Deterministic 16 kHz test signal: a voiced harmonic tone with syllable-rate bursts, a moving pitch
    and light noise (float32 in [-1, 1])."""
    rng = np.random.default_rng(SEED)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    syllables = np.clip(np.sin(2 * np.pi * 2.7 * t + 0.8 * np.sin(2 * np.pi * 0.4 * t)), 0, None)
    phase = 2 * np.pi * np.cumsum(140 + 50 * np.sin(2 * np.pi * 0.5 * t)) / SAMPLE_RATE
    voiced = 0.3 * np.sin(phase) + 0.15 * np.sin(2 * phase) + 0.08 * np.sin(3 * phase)
    return (syllables * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def save_tiny_wav2vec2(folder: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        apply_spec_augment=False,
        layerdrop=0.0,
    )
    torch.manual_seed(SEED)
    Wav2Vec2Model(config).save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    ).save_pretrained(folder)


def sox_shim(workdir: Path) -> types.ModuleType:
    """What `resample_audio` uses of torchaudio: sox_effects.apply_effects_tensor and transforms.Resample."""

    def apply_effects_tensor(tensor: torch.Tensor, sample_rate: int, effects: list[list[str]]):
        src, dst = workdir / "in.wav", workdir / "out.wav"
        sf.write(src, tensor.numpy().T, sample_rate, subtype="FLOAT")
        args = [arg for effect in effects for arg in effect]
        subprocess.run(
            ["sox", "-D", str(src), "-e", "floating-point", "-b", "32", str(dst), *args],
            check=True,
            capture_output=True,
        )
        data, rate = sf.read(dst, dtype="float32", always_2d=True)
        return torch.from_numpy(data.T.copy()), rate

    class Resample:
        def __init__(self, orig_freq: int, new_freq: int) -> None:
            if orig_freq != new_freq:
                raise NotImplementedError("the oracle's clip is 16 kHz: Resample is the identity")

        def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
            return waveform

    shim = types.ModuleType("torchaudio")
    shim.sox_effects = types.SimpleNamespace(apply_effects_tensor=apply_effects_tensor)
    shim.transforms = types.SimpleNamespace(Resample=Resample)
    return shim


def functions_from(path: Path, names: set[str], namespace: dict) -> dict:
    """Executes the named function definitions of `path` (at any depth) in `namespace`."""
    tree = ast.parse(path.read_text(), str(path))
    found = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = names - {node.name for node in found}
    if missing:
        raise SystemExit(f"{path} has no function(s) {sorted(missing)}: upstream changed")
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def import_upstream(root: Path, module: str) -> types.ModuleType:
    """Imports `module` from the checkout `root`; both upstreams name their package `src`."""
    for name in [n for n in sys.modules if n == "src" or n.startswith("src.") or n == module]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(root))


def liveact_outputs(root: Path, model_dir: Path, clip: np.ndarray, work: Path) -> dict[str, torch.Tensor]:
    from transformers import Wav2Vec2FeatureExtractor

    wav2vec2 = import_upstream(root, "src.audio_analysis.wav2vec2")
    util = import_upstream(root, "util_liveact")
    encoder = wav2vec2.Wav2Vec2Model.from_pretrained(str(model_dir), local_files_only=True).eval()
    encoder.feature_extractor._freeze_parameters()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
    shim = sox_shim(work)
    namespace = functions_from(
        root / "generate.py", {"resample_audio"}, {"torchaudio": shim, "T": shim.transforms}
    )

    audio_ori = torch.from_numpy(clip)[None]  # torchaudio.load's [channels, time]
    out: dict[str, torch.Tensor] = {}
    for fps in FPS:
        audio, _rate = namespace["resample_audio"](audio_ori, SAMPLE_RATE, fps)
        embedding = util.get_embedding(audio[0], extractor, encoder, device="cpu")
        out[f"liveact_fps{fps}_audio"] = audio[0].contiguous()
        out[f"liveact_fps{fps}_embedding"] = embedding.float().contiguous()
        for iteration in ITERATIONS[fps]:
            frame_num = (6 + 8 - 1) * 4 + 1  # generate.py: (sum(blksz_lst) - 1) * 4 + 1
            start = max(0, (iteration - 1) * 8 * 4)
            windows = util.get_audio_emb(embedding, start, start + frame_num, "cpu")
            out[f"liveact_fps{fps}_iter{iteration}_windows"] = windows[0].float().contiguous()
    return out


def infinitetalk_outputs(root: Path, model_dir: Path, clip: np.ndarray) -> dict[str, torch.Tensor]:
    import pyloudnorm
    from einops import rearrange
    from transformers import Wav2Vec2FeatureExtractor

    wav2vec2 = import_upstream(root, "src.audio_analysis.wav2vec2")
    # Its forward sets config.output_attentions = True, which transformers 4.57 refuses under SDPA.
    encoder = wav2vec2.Wav2Vec2Model.from_pretrained(
        str(model_dir), local_files_only=True, attn_implementation="eager"
    ).eval()
    encoder.feature_extractor._freeze_parameters()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
    namespace = functions_from(
        root / "generate_infinitetalk.py",
        {"loudness_norm", "get_embedding"},
        {"np": np, "torch": torch, "pyln": pyloudnorm, "rearrange": rearrange},
    )
    speech = namespace["loudness_norm"](clip, SAMPLE_RATE)
    embedding = namespace["get_embedding"](speech, extractor, encoder, device="cpu")
    return {"infinitetalk_embedding": embedding.float().contiguous()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--liveact", type=Path, required=True, help="SoulX-LiveAct work tree")
    parser.add_argument("--infinitetalk", type=Path, required=True, help="InfiniteTalk work tree")
    parser.add_argument("--liveact-commit", required=True)
    parser.add_argument("--infinitetalk-commit", required=True)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures" / "liveact_audio"
    )
    args = parser.parse_args()
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(
            f"transformers {transformers.__version__}: upstream's Wav2Vec2Model subclass needs 4.x "
            "(put it first on PYTHONPATH, see the docstring)"
        )
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "wav2vec2"
    shutil.rmtree(model_dir, ignore_errors=True)
    save_tiny_wav2vec2(model_dir)
    clip = speech_like_clip()
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        tensors = {"clip": torch.from_numpy(clip)}
        tensors.update(liveact_outputs(args.liveact, model_dir, clip, Path(work)))
        tensors.update(infinitetalk_outputs(args.infinitetalk, model_dir, clip))

    from safetensors.torch import save_file

    save_file(tensors, str(args.out / "upstream.safetensors"))
    sox_version = subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout.strip()
    meta = {
        "liveact_repo": "Soul-AILab/SoulX-LiveAct",
        "liveact_commit": args.liveact_commit,
        "infinitetalk_repo": "MeiGen-AI/InfiniteTalk",
        "infinitetalk_commit": args.infinitetalk_commit,
        "generated_by": "tests/oracles/make_liveact_audio_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sox": sox_version,
        "sample_rate": SAMPLE_RATE,
        "clip_samples": CLIP_SAMPLES,
        "fps": list(FPS),
        "liveact_gain": 3.0,
        "iterations": {str(fps): list(its) for fps, its in ITERATIONS.items()},
        "dtype": "float32",
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    (args.out / "upstream.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["tensors"], indent=2))


if __name__ == "__main__":
    main()

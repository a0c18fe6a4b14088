"""How much of the mouth-driving loudness the audio front-end's features carry: a linear probe.

    python -m training.audio_probe --widths 8,32 --out training/results/audio_probe.json

The DiT sees the audio only through the wav2vec2 features of `frontends.audio_features` (for the `tiny`
preset a seeded random wav2vec2 of `tiny_layers` layers of width `tiny_hidden_size`). If a ridge regression
from those features (each video frame's features with +-2 frames of context) cannot predict the per-frame
loudness envelope of held-out clips, no DiT trained on them can move the mouth with the speech either. The
probe is fitted on clips of both voices (numpy syllables and, when installed, espeak-ng speech) and scored
(Pearson r) on held-out clips of each voice. It is how the `tiny` preset's wav2vec2 width was chosen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontends.audio_features import AudioFeaturizer, AudioFeaturizerConfig, featurizer_config_for
from proto.model_config import get_model_preset
from training.data import Clip, DataConfig, SyntheticTalkingDataset

CONTEXT_FRAMES = 2
"""Video frames of context on each side of a frame's features (the DiT's window is wider: 2 latents)."""


def frame_features(
    featurizer: AudioFeaturizer, clip: Clip, chunk_latents: int
) -> tuple[np.ndarray, np.ndarray]:
    """(features [T', layers * dim], envelope [T']) for the clip's video frames the featuriser covers, in
    order (the first chunk's latent 0 stands for frame 0; latent k >= 1 for frames 4k - 3 ... 4k)."""
    featurizer.push(clip.audio.astype(np.float32))
    featurizer.end_of_stream()
    fpl = featurizer.config.frames_per_latent
    lookahead = featurizer.config.lookahead_latents
    num_chunks = (1 + (len(clip.envelope) - 1) // fpl) // chunk_latents
    own = [
        featurizer.features_for_chunk(chunk).span[lookahead : lookahead + chunk_latents]  # [F, P, L, D]
        for chunk in range(num_chunks)
    ]
    # Row i is video frame i - (fpl - 1): latent 0's first fpl - 1 rows lie before the stream.
    features = torch.cat(own).flatten(2).flatten(0, 1).numpy()[fpl - 1 :]
    return features, clip.envelope[: len(features)]


def with_context(features: np.ndarray, context: int = CONTEXT_FRAMES) -> np.ndarray:
    """Each row concatenated with its `context` neighbours on each side (edges repeated): [T, (2c+1)·d]."""
    padded = np.pad(features, ((context, context), (0, 0)), mode="edge")
    return np.concatenate([padded[i : i + len(features)] for i in range(2 * context + 1)], axis=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1e-3):
    """A standardised ridge regression x → y; returns the predictor."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda a: ((a - mean) / std) @ w + y.mean()


def _clips_features(
    config: AudioFeaturizerConfig, wav2vec: Any, voice: str, count: int, start: int, frames: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data = DataConfig(num_frames=frames, two_character_prob=0.0, silent_prob=0.0,
                      espeak_fraction=1.0 if voice == "espeak" else 0.0)  # fmt: skip
    dataset = SyntheticTalkingDataset(data, seed=seed)
    feats, envs = [], []
    for i in range(count):
        f, e = frame_features(AudioFeaturizer(config, wav2vec), dataset.clip(start + i), 3)
        feats.append(with_context(f))
        envs.append(e)
    return feats, envs


def probe(
    width: int, layers: int = 2, train_clips: int = 40, test_clips: int = 10, frames: int = 65, seed: int = 0
) -> dict[str, Any]:
    """Held-out Pearson r of the envelope predicted from a width-`width` tiny wav2vec2's features (seeded as
    the tiny preset's), per voice; `shuffled`: the same probe fitted to a time-shuffled envelope (chance).
    Training clips are indices 0 … train_clips - 1 of the data set `seed`, held-out ones start at 900,000."""
    model = get_model_preset("tiny")
    assert model.audio is not None
    # one wav2vec2 (the tiny preset's seed), two disjoint sets of clips
    config = featurizer_config_for(model.audio, fps=16, chunk_latents=3, tiny_seed=0,
                                   tiny_hidden_size=width, tiny_layers=layers)  # fmt: skip
    wav2vec = AudioFeaturizer(config).model
    voices = ["numpy"] + (["espeak"] if shutil.which("espeak-ng") else [])
    train_x, train_y, test = [], [], {}
    for voice in voices:
        x, y = _clips_features(config, wav2vec, voice, train_clips, 0, frames, seed)
        train_x += x
        train_y += y
        test[voice] = _clips_features(config, wav2vec, voice, test_clips, 900_000, frames, seed)
    x, y = np.concatenate(train_x), np.concatenate(train_y)
    predict = fit_ridge(x, y)
    shuffled = fit_ridge(x, np.random.default_rng(seed).permutation(y))
    out: dict[str, Any] = {"width": width, "layers": layers, "feature_dim": int(x.shape[1])}
    for voice, (tx, ty) in test.items():
        tx_all, ty_all = np.concatenate(tx), np.concatenate(ty)
        out[voice] = float(np.corrcoef(predict(tx_all), ty_all)[0, 1])
        out[f"{voice}_shuffled"] = float(np.corrcoef(shuffled(tx_all), ty_all)[0, 1])
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.audio_probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--widths", default="8,32", help="comma-separated tiny wav2vec2 widths (even)")
    parser.add_argument("--layers", type=int, default=2, help="wav2vec2 layers (the tiny preset's: 2)")
    parser.add_argument("--train-clips", type=int, default=40, help="clips per voice the probe is fitted on")
    parser.add_argument("--test-clips", type=int, default=10, help="held-out clips per voice")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.provenance import provenance

    args = parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        print(f"--widths must be comma-separated integers, got {args.widths!r}", file=sys.stderr)
        return 2
    if not shutil.which("espeak-ng"):
        print("note: espeak-ng is not installed; probing the numpy voice only", file=sys.stderr)
    rows = []
    for width in widths:
        try:
            row = probe(width, args.layers, args.train_clips, args.test_clips)
        except ValueError as exc:
            print(f"width {width}: {exc}", file=sys.stderr)
            return 2
        rows.append(row)
        voices = ", ".join(f"{v} r {row[v]:.3f} (shuffled {row[v + '_shuffled']:+.3f})"
                           for v in ("numpy", "espeak") if v in row)  # fmt: skip
        print(f"wav2vec2 width {width} x {args.layers} layers ({row['feature_dim']} features): {voices}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"provenance": provenance("training.audio_probe", argv), "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

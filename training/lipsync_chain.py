"""Where lip-sync is lost: the score at each link from the ground truth to the student's frames.

    python -m training.lipsync_chain --checkpoint server/weights/tiny \
        --teacher RUN/teacher/teacher.safetensors --clips 12 --out training/results/lipsync_chain.json

On the same held-out one-character speaking clips (of the DiT's training length by default), per voice (the
numpy syllables and, when installed, espeak-ng speech), the offset-0 lip-sync r (``training.lipsync``) of:

- ``truth``: the ground-truth frames;
- ``latent_rate``: the ground truth's measured mouth opening averaged over the 4 video frames of each latent
  frame (latent 0 is frame 0; latent k covers frames 4k-3 .. 4k), against the envelope: the best a mouth can
  do that moves only once per latent frame, as a VAE that keeps no motion inside a latent frame does;
- ``vae``: the bundle's VAE reconstruction of the ground truth (encode, decode);
- ``teacher_g3`` (with ``--teacher``): the teacher's ODE sample (16 Euler steps, audio guidance 3: the
  settings of stage C's regression targets and real score), decoded; ``--guidance 1,3,5`` adds a row per
  guidance scale;
- ``student``: the bundle's student, 2 steps on the whole clip under the sparse-causal mask (what
  ``training.evaluate``'s serving path computes chunk by chunk), decoded.

Each row also lists the per-clip values: clips differ a lot (0.2 to 0.6 on espeak-ng speech), so a mean over
a handful of clips moves by a tenth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontends.model_bundle import DEFAULT_BUNDLE_DIR, load_bundle
from proto.model_config import get_model_preset
from training.batches import ClipEncoder, as_training_model, load_or_build_vae
from training.data import Clip, SyntheticTalkingDataset
from training.distill import StudentConfig, student_rollout, teacher_ode
from training.lipsync import MIN_OPENING_STD, lipsync_score, mouth_opening_from_frames, pearson
from training.teacher import dit_data_config
from training.vae_stage import tensor_to_video
from workers.checkpoint import load_dit_checkpoint

# held out: training draws from 0.. and 1,000,000.., evaluation from 3,000,000..
CHAIN_INDEX_START = 2_000_000
TEACHER_STEPS = 16


def latent_rate_opening(opening: np.ndarray, stride: int = 4) -> np.ndarray:
    """A per-frame series [T] (T = 1 + stride * k) held at its mean over each latent frame's video frames."""
    opening = np.asarray(opening, np.float32)
    if (len(opening) - 1) % stride:
        raise ValueError(f"{len(opening)} frames is not 1 + {stride}k")
    out = opening.copy()
    for start in range(1, len(opening), stride):
        out[start : start + stride] = opening[start : start + stride].mean()
    return out


def chain_clips(voice: str, count: int, frames: int, seed: int = 0) -> list[Clip]:
    """Held-out one-character speaking clips of the DiT's data (64x64), all voiced by `voice` ("numpy" or
    "espeak")."""
    data = dataclasses.replace(
        dit_data_config(),
        num_frames=frames,
        espeak_fraction=1.0 if voice == "espeak" else 0.0,
        silent_prob=0.0,
        two_character_prob=0.0,
    )
    dataset = SyntheticTalkingDataset(data, seed)
    return [dataset.clip(CHAIN_INDEX_START + i) for i in range(count)]


@torch.no_grad()
def chain_scores(
    clips: Sequence[Clip],
    encoder: ClipEncoder,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None = None,
    guidance: Sequence[float] = (3.0,),
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-clip offset-0 lip-sync of each link (see the module docstring) for clips of one size and length."""
    vae = encoder.vae
    assert vae is not None
    inputs = encoder.encode_many(list(clips))
    noise = torch.randn((2, *inputs.latents.shape), generator=torch.Generator().manual_seed(seed))
    samples = {
        "vae": inputs.latents,
        "student": student_rollout(student, inputs, noise, StudentConfig().schedule),
    }
    if teacher is not None:
        for scale in guidance:
            samples[f"teacher_g{scale:g}"] = teacher_ode(teacher, inputs, noise[0], TEACHER_STEPS, 5.0, scale)
    rows: dict[str, list[float]] = {"truth": [], "latent_rate": [], **{name: [] for name in samples}}
    for i, clip in enumerate(clips):
        frames = len(clip.video)
        rows["truth"].append(lipsync_score(clip.video, clip)["correlation"])
        held = latent_rate_opening(mouth_opening_from_frames(clip.video, clip))
        rows["latent_rate"].append(pearson(held, clip.envelope, MIN_OPENING_STD))
        for name, latents in samples.items():
            video = tensor_to_video(vae.decode(latents[i : i + 1].float())[0].clamp(-1, 1))[:frames]
            rows[name].append(lipsync_score(video, clip)["correlation"])
    return {k: v for k, v in rows.items() if v}


def run_chain(
    bundle_dir: Path,
    teacher_path: Path | None,
    clips: int,
    frames: int,
    voices: Sequence[str],
    guidance: Sequence[float] = (3.0,),
) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    cfg = get_model_preset(bundle.preset)
    encoder = ClipEncoder(
        cfg, load_or_build_vae(str(bundle.vae), bundle.vae_preset), seed=bundle.encoder_seed
    )
    student = as_training_model(load_dit_checkpoint(str(bundle.dit), cfg, strict_audio=True)[0])
    teacher = None
    if teacher_path is not None:
        teacher = as_training_model(load_dit_checkpoint(str(teacher_path), cfg, strict_audio=True)[0])
    result: dict[str, Any] = {}
    for voice in voices:
        print(f"{voice}: {clips} clips of {frames} frames...", file=sys.stderr, flush=True)
        per_clip = chain_scores(chain_clips(voice, clips, frames), encoder, student, teacher, guidance)
        result[voice] = {
            "mean": {k: round(float(np.mean(v)), 4) for k, v in per_clip.items()},
            "per_clip": {k: [round(float(x), 4) for x in v] for k, v in per_clip.items()},
        }
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.lipsync_chain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_BUNDLE_DIR, help="model bundle (default: shipped)"
    )
    parser.add_argument("--teacher", type=Path, default=None, help="stage B's teacher.safetensors (optional)")
    parser.add_argument("--clips", type=int, default=12, help="clips per voice (default 12)")
    parser.add_argument("--frames", type=int, default=57, help="frames per clip, 12k - 3 (default 57)")
    parser.add_argument(
        "--guidance", default="3", metavar="G[,G...]", help="teacher audio guidance scales (default 3)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.provenance import provenance

    args = parse_args(argv)
    if args.clips < 1 or args.frames < 21 or (args.frames + 3) % 12:
        print("error: --clips must be >= 1 and --frames 12k - 3 with k >= 2 (k whole chunks of 3 latent "
              "frames: 21, 33, ..., 57, ..., 129)", file=sys.stderr)  # fmt: skip
        return 2
    for path, what in ((args.checkpoint, "model bundle"), (args.teacher, "teacher checkpoint")):
        if path is not None and not path.exists():
            print(f"error: no {what} at {path}", file=sys.stderr)
            return 2
    try:
        guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        guidance = []
    if not guidance or min(guidance) < 1:
        print(f"error: --guidance must be scales >= 1 separated by commas, got {args.guidance!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    voices = ["numpy"] + (["espeak"] if shutil.which("espeak-ng") else [])
    if len(voices) == 1:
        print("note: espeak-ng is not installed; the numpy voice only", file=sys.stderr)
    try:
        result = run_chain(args.checkpoint, args.teacher, args.clips, args.frames, voices, guidance)
    except ValueError as exc:  # a bundle or teacher that does not fit the preset
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for voice, row in result.items():
        print(f"{voice}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["mean"].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"provenance": provenance("training.lipsync_chain", argv), "clips": args.clips,
                   "frames": args.frames, **result}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

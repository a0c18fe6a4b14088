"""Evaluate a trained model bundle the way it is served.

    python -m training.evaluate --checkpoint DIR [--out results.json] [--clips 8] [--drift-seconds 120]
    python -m training.evaluate --checkpoint RUN/student/bundle --grid RUN      # + Table-1 rows
    python -m training.evaluate --random-weights                                 # the untrained baseline

DIR is a model bundle (``frontends.model_bundle``: model.json + student.safetensors + vae.pth); without
``--checkpoint`` the shipped default (``server/weights/tiny``) is evaluated.

Every number comes from the serving path run in-process: the clip's reference image and audio go through the
same front-ends ``talkingmachines run`` uses (tiny umT5/CLIP/wav2vec2 with the bundle's encoder seed, the
I2V conditioning, ``workers.score_rank.ScoreRank`` with the streaming KV cache, ``decoder.streaming``), chunk
by chunk, one rank doing both score and decode (the colocated topology).

Metrics, on held-out synthetic clips (indices from ``EVAL_INDEX_START``; training uses 0.. and 1,000,000..):

- lip-sync (Sync-C / Sync-D analogue): the mouth opening measured on the generated frames inside the clip's
  known mouth box (``training.lipsync``) against the audio envelope: Pearson correlation at offset 0, the best
  correlation over ±6 frames and its offset, and confidence (best minus median over offsets);
- quality: PSNR of the generated clip against the ground-truth clip drawn with the same audio (whole frame
  and mouth box); the VAE's own reconstruction PSNR is the ceiling;
- silence: mean mouth opening when the audio is silent, next to the same measure on the ground truth (a
  closed mouth reads above 0: its lip line);
- identity drift over a long stream (2 minutes by default): PSNR against the ground truth per 10 s window,
  first window vs last (error accumulation shows as a falling PSNR), and lip-sync per window;
- TTBC on this machine (score + decode per chunk, one process) against the chunk's duration.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.provenance import provenance
from decoder.checkpoint import load_vae
from decoder.encode import I2VConditioning
from decoder.streaming import DecodeSession
from decoder.vae import build_vae
from frontends.audio_features import AudioFeaturizer, check_matches, featurizer_config_for
from frontends.conditioning import ConditioningConfig, ConditioningEncoders
from frontends.model_bundle import DEFAULT_BUNDLE_DIR, ModelBundle, load_bundle
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.vae_config import get_vae_preset
from proto.wire import SessionClose
from training.data import Clip, DataConfig, SyntheticTalkingDataset
from training.lipsync import lipsync_score, mouth_opening_from_frames
from training.vae_stage import mouth_mask
from workers.factory import build_score_model
from workers.score_rank import ScoreRank

EVAL_INDEX_START = 3_000_000
SESSION = "eval"
LIPSYNC_THRESHOLD = 0.2
"""Offset-0 correlation a model must beat to count as lip-syncing (ground truth scores ~0.9; a frozen or
random mouth ~0). The committed default is tested against it, and a random-weight model must stay below."""


@dataclass
class GeneratedStream:
    """frames uint8 `[T, H, W, 3]`; per-chunk score and decode seconds; the chunk's video duration."""

    frames: np.ndarray
    score_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    chunk_duration_s: float = 0.75

    def ttbc(self) -> dict[str, float]:
        """TTBC over the chunks after the first (the warm-up chunk has 9 frames)."""
        return ttbc_summary(self.score_s[1:], self.decode_s[1:], self.chunk_duration_s)


def ttbc_summary(
    score_s: Sequence[float], decode_s: Sequence[float], chunk_duration_s: float
) -> dict[str, float]:
    """Median and p90 of score + decode per chunk, and the real-time factor against the chunk's duration."""
    total = np.asarray(score_s) + np.asarray(decode_s)
    if total.size == 0:
        return {}
    return {
        "ttbc_p50_s": float(np.median(total)),
        "ttbc_p90_s": float(np.quantile(total, 0.9)),
        "score_p50_s": float(np.median(score_s)),
        "decode_p50_s": float(np.median(decode_s)),
        "chunk_duration_s": chunk_duration_s,
        "real_time_factor": float(np.median(total)) / chunk_duration_s,
    }


class Generator:
    """The serving path in one process: a bundle's (or random) DiT + VAE + front-ends, chunk by chunk."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        chunk_latents: int | None = None,
        denoising_steps: Sequence[int] | None = None,
        random_weights: bool = False,
        seed: int = 0,
    ) -> None:
        self.bundle = bundle
        cfg = get_model_preset(bundle.preset)
        self.config = cfg
        if random_weights:
            self.model = build_score_model(bundle.preset, None, seed=seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.vae = build_vae(get_vae_preset(bundle.vae_preset))
        else:
            self.model = build_score_model(bundle.preset, bundle.dit)
            self.vae = load_vae(bundle.vae, get_vae_preset(bundle.vae_preset))
        self.vae.eval()
        self.stream = StreamConfig(
            height=bundle.height,
            width=bundle.width,
            chunk_latent_frames=chunk_latents or bundle.chunk_latent_frames,
            denoising_steps=tuple(denoising_steps or bundle.denoising_steps),
            timestep_shift=bundle.timestep_shift,
            train_latent_frames=bundle.train_latent_frames,
        )
        self.encoders = ConditioningEncoders.from_config(
            ConditioningConfig.for_model(cfg, tiny_seed=bundle.encoder_seed)
        )
        assert cfg.audio is not None
        self.featurizer_config = featurizer_config_for(
            cfg.audio,
            fps=self.stream.fps,
            chunk_latents=self.stream.chunk_latent_frames,
            tiny_seed=bundle.encoder_seed,
        )
        self._wav2vec = AudioFeaturizer(self.featurizer_config).model
        check_matches(AudioFeaturizer(self.featurizer_config, self._wav2vec), cfg.audio)
        self.rank = ScoreRank(self.model, self.stream)

    @torch.no_grad()
    def generate(self, image: np.ndarray, audio: np.ndarray, seed: int = 0) -> GeneratedStream:
        """Frames for `audio` (float32 16 kHz mono) from the reference `image` (uint8 `[H, W, 3]`)."""
        # run's own scheduler, SessionOpen and engine: same audio windows, same seeds, same tensors
        from engine.executor import InProcessExecutor
        from engine.file_stream import ChunkScheduler, RunSession, run_stream
        from engine.session_open import FULL_FRAME, session_open
        from engine.stats import StreamStats

        stream = self.stream
        featurizer = AudioFeaturizer(self.featurizer_config, self._wav2vec)
        conditioning = I2VConditioning.for_stream(self.vae, image, stream)
        scheduler = ChunkScheduler(self.config, stream, featurizer, conditioning, audio, seed, SESSION)
        message, tensors = session_open(
            SESSION, self.config, stream, self.encoders, self.bundle.prompt, image, [FULL_FRAME]
        )
        executor = InProcessExecutor(self.rank)
        executor.open_session(message, tensors)
        sink = _FrameList()
        session = RunSession(scheduler, DecodeSession(self.vae, stream.height, stream.width), sink)
        stats = StreamStats("evaluate", stream.chunk_duration_s(1))
        try:
            run_stream(executor, session, stream, stats, overlap=False, device=torch.device("cpu"))
        finally:
            executor.close_session(SessionClose(SESSION))
        out = GeneratedStream(np.concatenate(sink.frames), chunk_duration_s=stream.chunk_duration_s(1))
        out.score_s = [c.score_s for c in stats.chunks]
        out.decode_s = [c.decode_s for c in stats.chunks]
        return out


class _FrameList:
    """A sink that keeps the frames (``engine.file_stream.FrameSink``)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        self.frames.append(frames)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 videos (optionally over mask [T, H, W] == True)."""
    err = (a.astype(np.float32) - b.astype(np.float32)) ** 2
    mse = float(err.mean()) if mask is None else float(err[mask].mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-9))


def eval_clips(
    bundle: ModelBundle, count: int, num_frames: int, silent: bool = False, espeak: bool = False
) -> list[Clip]:
    """Held-out one-character clips at the bundle's size: speaking ones (numpy voice, or espeak-ng speech),
    or silent ones."""
    data = DataConfig(
        height=bundle.height,
        width=bundle.width,
        num_frames=num_frames,
        two_character_prob=0.0,
        silent_prob=1.0 if silent else 0.0,
        espeak_fraction=1.0 if espeak else 0.0,
    )
    dataset = SyntheticTalkingDataset(data, seed=0)
    offset = 500_000 if silent else 0
    return [dataset.clip(EVAL_INDEX_START + offset + i) for i in range(count)]


def score_clip(generated: np.ndarray, clip: Clip) -> dict[str, float]:
    """Lip-sync and quality of generated frames against a clip (same length)."""
    t = min(len(generated), len(clip.video))
    generated, truth = generated[:t], clip.video[:t]
    trimmed = _trim_window(clip, 0, t)
    sync = lipsync_score(generated, trimmed)
    return {
        "lipsync": float(sync["correlation"]),
        "lipsync_best": float(sync["best_correlation"]),
        "offset_frames": int(sync["offset_frames"]),
        "confidence": float(sync["confidence"]),
        "psnr": psnr(generated, truth),
        "psnr_mouth": psnr(generated, truth, mouth_mask(clip, slice(0, t), *truth.shape[1:3]) > 0),
    }


def save_still(path: Path, *videos: np.ndarray, count: int = 8, scale: int = 3) -> Path:
    """A PNG of `count` evenly spaced frames per video (uint8 `[T, H, W, 3]`), one row each (e.g. ground
    truth above, generated below), upscaled `scale` times."""
    from PIL import Image

    t = min(len(v) for v in videos)
    picks = np.linspace(0, t - 1, count).round().astype(int)
    rows = [np.concatenate([video[i] for i in picks], axis=1) for video in videos]
    strip = Image.fromarray(np.concatenate(rows, axis=0))
    strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def save_speech_plot(path: Path, clip: Clip, generated: np.ndarray, fps: int) -> Path:
    """A PNG of the generated mouth opening (measured on the frames with the clip's geometry) against the
    audio envelope and the ground-truth opening over time: does the mouth follow the speech?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = min(len(generated), len(clip.video))
    clip = _trim_window(clip, 0, t)
    generated_opening = mouth_opening_from_frames(generated[:t], clip)
    truth_opening = mouth_opening_from_frames(clip.video[:t], clip)
    seconds = np.arange(t) / fps
    r = lipsync_score(generated[:t], clip)["correlation"]

    def unit(x: np.ndarray) -> np.ndarray:
        span = float(x.max() - x.min())
        return (x - x.min()) / span if span > 0 else x * 0

    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.fill_between(seconds, unit(clip.envelope), color="0.85", label="audio envelope")
    ax.plot(seconds, unit(truth_opening), color="0.4", lw=1, ls="--", label="ground-truth mouth opening")
    label = f"generated mouth opening (r = {r:.2f})"
    ax.plot(seconds, unit(generated_opening), color="C3", lw=1.8, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("normalised")
    ax.set_title(f"{clip.voice} speech: mouth opening measured on the generated frames")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_mp4_frames(path: Path) -> np.ndarray:
    """The video frames of an MP4 (e.g. `talkingmachines run`'s output) as uint8 `[T, H, W, 3]`."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return np.stack(frames)


def evaluate_generator(
    gen: Generator,
    clips: Sequence[Clip],
    silent: Sequence[Clip] = (),
    seed: int = 0,
    still: Path | None = None,
    speech_plot: Path | None = None,
) -> dict[str, Any]:
    """Mean metrics over `clips` (speaking) and the silent-mouth check over `silent`; with `still`, a PNG
    of the first clip (ground truth above, generated below); with `speech_plot`, its mouth opening against
    the audio envelope (`save_speech_plot`)."""
    rows, timings = [], []
    for clip in clips:
        result = gen.generate(clip.reference, clip.audio, seed=seed)
        rows.append(score_clip(result.frames, clip))
        timings.append(result)
        if len(rows) == 1 and still is not None:
            save_still(still, clip.video, result.frames)
        if len(rows) == 1 and speech_plot is not None:
            save_speech_plot(speech_plot, clip, result.frames, gen.stream.fps)
    summary: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    summary["offset_frames_median"] = int(np.median([r["offset_frames"] for r in rows]))
    summary["per_clip"] = rows
    openings, truth = [], []
    for clip in silent:
        result = gen.generate(clip.reference, clip.audio, seed=seed)
        t = min(len(result.frames), len(clip.video))
        trimmed = _trim_window(clip, 0, t)
        openings.append(float(mouth_opening_from_frames(result.frames[:t], trimmed, 0).mean()))
        truth.append(float(mouth_opening_from_frames(clip.video[:t], trimmed, 0).mean()))
    if openings:
        summary["silent_mouth_opening"] = float(np.mean(openings))
        # the same measure on the ground-truth frames: a closed mouth's lip line is not 0
        summary["silent_mouth_opening_ground_truth"] = float(np.mean(truth))
    steady = [(r.score_s[1:], r.decode_s[1:]) for r in timings]  # each stream's warm-up chunk left out
    summary.update(
        ttbc_summary(
            [x for score, _ in steady for x in score],
            [x for _, decode in steady for x in decode],
            timings[0].chunk_duration_s,
        )
    )
    return summary


def identity_drift(gen: Generator, seconds: float, window_s: float = 10.0, seed: int = 0) -> dict[str, Any]:
    """A long stream from one reference: PSNR and lip-sync per window, first vs last window."""
    fps = gen.stream.fps
    frames = 1 + 4 * math.ceil(seconds * fps / 4)
    (clip,) = eval_clips(gen.bundle, 1, frames)
    start = time.perf_counter()
    result = gen.generate(clip.reference, clip.audio, seed=seed)
    wall = time.perf_counter() - start
    t = min(len(result.frames), len(clip.video))
    step = min(int(window_s * fps), t)  # a stream shorter than a window is one window
    windows = []
    for lo in range(0, t - step + 1, step):
        part = _trim_window(clip, lo, lo + step)
        sync = lipsync_score(result.frames[lo : lo + step], part)
        windows.append(
            {
                "start_s": lo / fps,
                "psnr": psnr(result.frames[lo : lo + step], clip.video[lo : lo + step]),
                "lipsync": float(sync["correlation"]),
            }
        )
    return {
        "seconds": t / fps,
        "wall_s": wall,
        "windows": windows,
        "psnr_first_window": windows[0]["psnr"],
        "psnr_last_window": windows[-1]["psnr"],
        "psnr_drop_db": windows[0]["psnr"] - windows[-1]["psnr"],
        "lipsync_first_window": windows[0]["lipsync"],
        "lipsync_last_window": windows[-1]["lipsync"],
        **result.ttbc(),
    }


def _trim_window(clip: Clip, lo: int, hi: int) -> Clip:
    import dataclasses

    fields = {}
    for name in ("video", "envelope"):
        fields[name] = getattr(clip, name)[lo:hi]
    for name in ("mouth_open", "speaking", "mouth_boxes_px"):
        fields[name] = getattr(clip, name)[:, lo:hi]
    return dataclasses.replace(clip, **fields)


def grid_bundles(run_dir: Path) -> list[Path]:
    """The Table-1 bundles under a training output directory: student*/bundle."""
    return sorted(p.parent for p in run_dir.glob("student*/bundle/model.json"))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the shape of the paper's Table 1."""
    head = (
        "| chunk (latent frames) | steps | lip-sync r (offset 0) | offset (frames) | confidence | "
        "PSNR dB | mouth PSNR dB | TTBC p50 s | chunk s | real-time factor |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['chunk']} | {r['steps']} | {r['lipsync']:.3f} | {r['offset_frames_median']:+d} | "
        f"{r['confidence']:.3f} | {r['psnr']:.2f} | {r['psnr_mouth']:.2f} | "
        f"{r.get('ttbc_p50_s', float('nan')):.3f} | "
        f"{r.get('chunk_duration_s', float('nan')):.2f} | {r.get('real_time_factor', float('nan')):.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="model bundle dir (default: shipped)")
    parser.add_argument(
        "--random-weights", action="store_true", help="evaluate seeded random weights instead"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    parser.add_argument("--clips", type=int, default=8, help="held-out speaking clips (default 8)")
    parser.add_argument("--silent-clips", type=int, default=2, help="held-out silent clips (default 2)")
    parser.add_argument("--clip-frames", type=int, default=129, help="frames per clip, 1 + 4k (default 129)")
    parser.add_argument(
        "--speech-clips", type=int, default=12,
        help="clips voiced by espeak-ng, when installed (real speech; default 12: clips differ by 0.2-0.6)",
    )
    parser.add_argument("--drift-seconds", type=float, default=120.0, help="long-stream length; 0 skips it")
    parser.add_argument(
        "--grid", type=Path, default=None, help="training output dir: evaluate student*/bundle"
    )
    parser.add_argument("--still", type=Path, default=None, help="PNG: ground truth vs generated frames")
    parser.add_argument(
        "--speech-plot", type=Path, default=None,
        help="PNG: mouth opening vs audio envelope on the first espeak-ng clip (needs --speech-clips)",
    )  # fmt: skip
    parser.add_argument(
        "--still-from-mp4", type=Path, default=None,
        help="only write --still from this MP4's frames (e.g. talkingmachines run's output), then exit",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clips < 1 or args.clip_frames < 33 or (args.clip_frames - 1) % 4:
        parser.error("--clips must be >= 1 and --clip-frames 1 + 4k and >= 33")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.still_from_mp4 is not None:
        if args.still is None:
            print("error: --still-from-mp4 needs --still PNG", file=sys.stderr)
            return 2
        print(f"wrote {save_still(args.still, read_mp4_frames(args.still_from_mp4))}", file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.checkpoint or DEFAULT_BUNDLE_DIR
    try:
        bundle = load_bundle(path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "random weights" if args.random_weights else str(path)
    print(
        f"evaluating {what}: {bundle.height}x{bundle.width}, {args.clips} clips of {args.clip_frames} frames",
        file=sys.stderr,
        flush=True,
    )
    clips = eval_clips(bundle, args.clips, args.clip_frames)
    silent = eval_clips(bundle, args.silent_clips, args.clip_frames, silent=True) if args.silent_clips else []
    gen = Generator(bundle, random_weights=args.random_weights, seed=args.seed)
    results: dict[str, Any] = {
        "provenance": provenance("training.evaluate", argv),
        "checkpoint": what,
        "bundle": str(path),
        "settings": {
            "clips": args.clips,
            "clip_frames": args.clip_frames,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "threshold": LIPSYNC_THRESHOLD,
        },
    }
    results["main"] = evaluate_generator(gen, clips, silent, seed=args.seed, still=args.still)
    truth = [lipsync_score(c.video, c)["correlation"] for c in clips]
    results["ground_truth_lipsync"] = float(np.mean(truth))
    main_row = results["main"]
    print(
        f"lip-sync r {main_row['lipsync']:.3f} (ground truth {results['ground_truth_lipsync']:.3f}), offset "
        f"{main_row['offset_frames_median']:+d}, PSNR {main_row['psnr']:.2f} dB",
        file=sys.stderr,
        flush=True,
    )
    if args.speech_clips and shutil.which("espeak-ng"):
        speech = eval_clips(bundle, args.speech_clips, args.clip_frames, espeak=True)
        real = evaluate_generator(gen, speech, seed=args.seed, speech_plot=args.speech_plot)
        real["lipsync_per_clip"] = [round(row["lipsync"], 4) for row in real.pop("per_clip")]  # 0.2-0.6
        results["espeak_speech"] = real
        print(f"espeak-ng speech: lip-sync r {real['lipsync']:.3f}, offset {real['offset_frames_median']:+d}",
              file=sys.stderr, flush=True)  # fmt: skip
    if args.drift_seconds > 0:
        print(f"identity drift: a {args.drift_seconds:.0f} s stream...", file=sys.stderr, flush=True)
        results["drift"] = identity_drift(gen, args.drift_seconds, seed=args.seed)
        d = results["drift"]
        print(
            f"  PSNR first/last 10 s window {d['psnr_first_window']:.2f} / {d['psnr_last_window']:.2f} dB",
            file=sys.stderr,
            flush=True,
        )
    if args.grid is not None:
        rows = []
        for bundle_dir in grid_bundles(args.grid):
            variant = load_bundle(bundle_dir)
            print(
                f"grid: {bundle_dir} (chunk {variant.chunk_latent_frames}, steps "
                f"{len(variant.denoising_steps)})",
                file=sys.stderr,
                flush=True,
            )
            summary = evaluate_generator(Generator(variant), clips, seed=args.seed)
            summary.pop("per_clip")
            rows.append(
                {
                    "chunk": variant.chunk_latent_frames,
                    "steps": len(variant.denoising_steps),
                    "bundle": str(bundle_dir),
                    **summary,
                }
            )
        rows.sort(key=lambda r: (-r["chunk"], -r["steps"]))
        results["grid"] = rows
        print(format_table(rows))
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

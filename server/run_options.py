"""The options of ``talkingmachines run``: the group's options (``server.options``) plus the inputs and
outputs of one job, parsed once, validated before any rank starts, shared by all ranks.

Every rank of the world receives the same argument list and parses it with ``parse_run_options``.
``validate_inputs`` is the CLI's gate: bad inputs (unreadable audio, an image too large, an unknown preset,
a worker count that does not divide the heads, a bad size, a configuration whose memory plan does not fit
the devices: ``engine.memory_plan``) fail there with a clear message and exit code 2, before a single
process starts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from frontends.audio_io import TARGET_SAMPLE_RATE, AudioDecodeError, load_audio
from frontends.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from server.options import GroupOptions, add_group_arguments, group_options

DEFAULT_MAX_AUDIO_S = 600.0


@dataclass(frozen=True, kw_only=True)
class RunOptions(GroupOptions):
    """Validated ``run`` arguments: the group's options plus one job's inputs and outputs."""

    image: Path
    audio: Path
    out: Path
    overlap: bool
    stats_json: Path | None
    save_frames: Path | None
    max_audio_s: float
    max_image_pixels: int
    progress: bool
    stream_audio: bool = False


def build_run_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``run``'s arguments to ``parser``."""
    parser.add_argument("--image", required=True, type=Path, help="reference portrait, PNG or JPEG")
    parser.add_argument(
        "--audio", required=True, type=Path, help="speech, WAV/FLAC/OGG (any rate, mono or stereo)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output MP4 (H.264 + AAC, at the preset's fps: 16; LiveAct: 24)",
    )
    add_group_arguments(parser, "run", prompt_help="text prompt (umT5)")
    parser.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_false",
        help="disaggregated only: decode and score in turn instead of overlapping them (for comparisons)",
    )
    parser.add_argument(
        "--stats-json", type=Path, default=None, help="write per-chunk timings and memory here"
    )
    parser.add_argument(
        "--save-frames",
        type=Path,
        default=None,
        help="also write the exact uint8 frames, raw [T, H, W, 3] (to compare runs bit for bit)",
    )
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_S)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no per-chunk progress lines")
    parser.add_argument(
        "--stream-audio",
        action="store_true",
        help="SoulX-LiveAct presets: featurise the audio with serve's live front-end (a rolling buffer) "
        "instead of the whole clip as upstream's offline generation does, to compare run with serve "
        "(the TalkingMachines front-end always streams)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Turn parsed arguments into ``RunOptions``; raises ``ValueError`` with a message for the user."""
    return group_options(
        args,
        RunOptions,
        image=args.image,
        audio=args.audio,
        out=args.out,
        overlap=args.overlap,
        stats_json=args.stats_json,
        save_frames=args.save_frames,
        max_audio_s=args.max_audio_seconds,
        max_image_pixels=args.max_image_pixels,
        progress=args.progress,
        stream_audio=args.stream_audio,
    )


def parse_run_options(argv: list[str]) -> RunOptions:
    """Parse ``run``'s arguments inside a rank (they were validated by the CLI already)."""
    parser = build_run_parser(argparse.ArgumentParser(prog="talkingmachines run"))
    return options_from_args(parser.parse_args(argv))


def validate_inputs(options: RunOptions) -> None:
    """Everything that can be checked before the world starts; raises ``ValueError`` with the fix."""
    try:
        audio = load_audio(options.audio, max_seconds=options.max_audio_s)
    except AudioDecodeError as exc:
        raise ValueError(str(exc)) from exc
    if audio.size < math.ceil(TARGET_SAMPLE_RATE / options.stream_config().fps):
        raise ValueError(f"audio file {str(options.audio)!r} holds less than one video frame of audio")
    try:
        load_image(options.image, max_pixels=options.max_image_pixels)
    except ImageDecodeError as exc:
        raise ValueError(str(exc)) from exc
    if not options.out.parent.resolve().is_dir():
        raise ValueError(f"output directory {str(options.out.parent)!r} does not exist — create it first")
    if options.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {str(options.out)!r} must end in .mp4")
    options.check_local_devices()
    if not math.isfinite(options.max_audio_s) or options.max_audio_s <= 0:
        raise ValueError(f"--max-audio-seconds must be positive, got {options.max_audio_s}")
    from engine.memory_plan import check_options_memory

    check_options_memory(options, sessions=1)  # last: it may measure the GPUs

"""The options of ``talkingmachines run``: parsed once, validated before any rank starts, shared by all ranks.

Every rank of the world receives the same argument list and parses it with ``parse_run_options``, so the
master and the workers agree on the preset, the stream configuration and the seed without another message.
``validate_inputs`` is the CLI's gate: bad inputs (unreadable audio, an image too large, an unknown preset,
a worker count that does not divide the heads, a bad size, a configuration whose memory plan does not fit
the devices: ``engine.memory_plan``) fail there with a clear message and exit code 2, before a single
process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from decoder.streaming import DecodeOptions
from frontends.audio_io import AudioDecodeError, load_audio
from frontends.image_io import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from frontends.model_bundle import ModelBundle, resolve_weights
from proto.model_config import ModelConfig, get_model_preset, model_preset_names
from proto.stream_config import StreamConfig
from proto.topology import Topology
from proto.vae_config import get_vae_preset

# Frame size when --resolution (or --height/--width) is not given and no trained bundle fixes it, for run and
# serve alike: tiny --random-weights at 32x32 keeps up with real time on a CPU core (the random VAE decodes a
# 12-frame chunk in about 0.1 s there, 0.25 s at 64x64, 1.6 s at 128x128); the real presets stream at 512².
DEFAULT_TINY_SIZE = (32, 32)
DEFAULT_SIZE = (512, 512)
DEFAULT_MAX_AUDIO_S = 600.0
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = (
    "precision of the DiT and the CLIP/umT5 encoders (default auto: bfloat16 on CUDA, float32 on CPU). "
    "bfloat16 keeps Wan's float32 islands (time embedding, modulation, norms, head) and float32 latents; "
    "the VAE keeps float32 weights and decodes under bfloat16 autocast (the one-off reference encode stays "
    "float32); wav2vec2 runs on the host CPU in float32 whatever the choice"
)


VAE_AUTOCAST = ("auto", "none", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class WeightsOptions:
    """What a trained bundle fixes (``bundle_settings``) and the precision the models run in (``--dtype``),
    shared by ``run`` and ``serve`` options; the defaults are those of seeded random weights in float32.
    Subclasses define ``seed``, ``height``, ``width`` and ``steps`` (``--steps``: N evenly spaced denoising
    steps instead of the weights' own). The ``vae_*`` fields are the decoder options both commands share
    (``add_decode_arguments``)."""

    seed: int  # redeclared (positionally) by the subclasses
    dtype: str = "float32"  # --dtype resolved for the device (``resolve_dtype``): "float32" or "bfloat16"
    train_latent_frames: int = 21
    default_denoising_steps: tuple[int, ...] = (1000, 500)
    timestep_shift: float = 5.0
    encoder_seed: int | None = None
    weights: str = "seeded random weights"
    compile_score: bool = False  # --compile: torch.compile the score model's blocks (StreamingDiT)
    vae_autocast: str = "auto"
    vae_channels_last: bool = False
    vae_compile: bool = False
    vae_chunk_at_once: bool = False

    def decode_options(self) -> DecodeOptions:
        """The ``DecodeSession`` options of ``--vae-autocast/--vae-channels-last/--vae-compile/...``."""
        autocast = {"auto": self.vae_autocast_dtype, "none": None, "bfloat16": torch.bfloat16}
        return DecodeOptions(
            autocast_dtype=autocast[self.vae_autocast],
            channels_last=self.vae_channels_last,
            compile_step=self.vae_compile,
            chunk_at_once=self.vae_chunk_at_once,
        )

    @property
    def tiny_encoder_seed(self) -> int:
        """Seed of the tiny random umT5/CLIP/wav2vec2: the bundle's training seed, else ``--seed``."""
        return self.seed if self.encoder_seed is None else self.encoder_seed

    def stream_config(self) -> StreamConfig:
        steps = self.default_denoising_steps
        if self.steps is not None:  # type: ignore[attr-defined]
            steps = evenly_spaced_steps(self.steps)  # type: ignore[attr-defined]
        return StreamConfig(
            height=self.height,  # type: ignore[attr-defined]
            width=self.width,  # type: ignore[attr-defined]
            denoising_steps=steps,
            timestep_shift=self.timestep_shift,
            train_latent_frames=self.train_latent_frames,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The DiT's and the CLIP/umT5 encoders' dtype (their outputs are float32 on the wire)."""
        return getattr(torch, self.dtype)

    @property
    def vae_autocast_dtype(self) -> torch.dtype | None:
        """The VAE decoder's autocast dtype (``DecodeSession``): its weights stay float32."""
        return torch.bfloat16 if self.dtype == "bfloat16" else None


def resolve_dtype(choice: str, device: str) -> str:
    """``--dtype`` for ``device``: ``auto`` is bfloat16 on CUDA (an 18B DiT in float32 needs ~72 GB for its
    weights alone) and float32 on the CPU; ``ValueError`` for anything not in ``DTYPE_CHOICES`` (a config
    file's value bypasses argparse's check)."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {choice!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if choice == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return choice


@dataclass(frozen=True)
class RunOptions(WeightsOptions):
    """Validated ``run`` arguments. Sizes in pixels, times in seconds."""

    image: Path
    audio: Path
    out: Path
    preset: str
    score_workers: int
    decoder: str
    seed: int
    height: int
    width: int
    prompt: str
    checkpoint: str | None
    vae_checkpoint: str | None
    wav2vec_checkpoint: str | None
    clip_checkpoint: str | None
    umt5_checkpoint: str | None
    device: str
    threads: int
    steps: int | None
    overlap: bool
    chunk_timeout_s: float
    stats_json: Path | None
    save_frames: Path | None
    max_audio_s: float
    max_image_pixels: int
    progress: bool
    device_memory_gib: float | None = None

    @property
    def model_config(self) -> ModelConfig:
        return get_model_preset(self.preset)

    @property
    def vae_preset(self) -> str:
        """The VAE that matches the DiT preset: the tiny VAE for ``tiny``, Wan 2.1's for the real ones."""
        return "tiny" if self.preset == "tiny" else "wan2.1"

    def topology(self) -> Topology:
        return Topology(
            score_workers=self.score_workers,
            decoder=self.decoder,  # type: ignore[arg-type]
            device=self.device,  # type: ignore[arg-type]
            num_heads=self.model_config.num_heads,
            preset=self.preset,
        )


def evenly_spaced_steps(n: int) -> tuple[int, ...]:
    """N steps spread evenly over (0, 1000], starting at pure noise: 1000, 1000 - 1000/N, …"""
    return tuple(sorted({round(1000 - 1000 * i / n) for i in range(n)}, reverse=True))


def bundle_settings(bundle: ModelBundle | None) -> dict[str, object]:
    """The option fields a trained bundle fixes (empty without one)."""
    if bundle is None:
        return {}
    return {
        "train_latent_frames": bundle.train_latent_frames,
        "default_denoising_steps": bundle.denoising_steps,
        "timestep_shift": bundle.timestep_shift,
        "encoder_seed": bundle.encoder_seed,
        "weights": bundle.describe(),
    }


def build_run_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``run``'s arguments to ``parser``."""
    parser.add_argument("--image", required=True, type=Path, help="reference portrait, PNG or JPEG")
    parser.add_argument(
        "--audio", required=True, type=Path, help="speech, WAV/FLAC/OGG (any rate, mono or stereo)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output MP4 (H.264 + AAC, 16 fps)")
    add_group_arguments(parser, "run", prompt_help="text prompt (umT5)")
    parser.add_argument("--height", type=int, default=None, help="pixels (instead of --resolution)")
    parser.add_argument("--width", type=int, default=None, help="pixels (instead of --resolution)")
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
    return parser


def add_group_arguments(parser: argparse.ArgumentParser, command: str, prompt_help: str) -> None:
    """What ``run`` and ``serve`` share, defined once: the serving group (preset, topology, device, threads),
    its size, seed and prompt, the weights and their precision (``add_weights_arguments``), the encoders,
    the decoder options (``add_decode_arguments``) and the memory plan's budget (``add_memory_arguments``).
    The commands differ only in what is theirs (inputs and outputs for ``run``; the API for ``serve``) and
    in ``--chunk-timeout``'s default (``CHUNK_TIMEOUT_S``)."""
    tiny_h, tiny_w = DEFAULT_TINY_SIZE
    parser.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(model_preset_names())}")
    parser.add_argument("--score-workers", type=int, default=1, help="N, the score workers (SP degree)")
    parser.add_argument(
        "--decoder",
        choices=("dedicated", "colocated"),
        default=None,
        help="dedicated: 1 master + N workers (disaggregated); colocated: N ranks, rank 0 also decodes "
        "(default: dedicated, or colocated on CUDA when there are fewer than N + 1 GPUs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise and random-weight seed")
    parser.add_argument(
        "--resolution",
        default=None,
        help="HxW in pixels, multiples of 16 (default: a trained bundle's training size, 64x64 for the "
        f"tiny default; {tiny_h}x{tiny_w} for tiny --random-weights; "
        f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]} otherwise)",
    )
    parser.add_argument("--prompt", default="a person talking", help=prompt_help)
    add_weights_arguments(parser)
    add_decode_arguments(parser)
    parser.add_argument(
        "--wav2vec-checkpoint", default=None, help="local wav2vec2 folder; default: tiny random"
    )
    parser.add_argument(
        "--clip-checkpoint", default=None, help="local CLIP vision folder; default: tiny random"
    )
    parser.add_argument("--umt5-checkpoint", default=None, help="local umT5 folder; default: tiny random")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)"
    )
    parser.add_argument(
        "--chunk-timeout",
        type=float,
        default=CHUNK_TIMEOUT_S[command],
        help=f"seconds to wait for a chunk's latent (default for {command}: {CHUNK_TIMEOUT_S[command]:g})",
    )
    add_memory_arguments(parser)


# Seconds to wait for a chunk's latent before the score side counts as failed. run streams a file and may
# start with slow first chunks (a cold GPU, --compile); serve must notice a stuck group while calls wait.
CHUNK_TIMEOUT_S = {"run": 60.0, "serve": 10.0}


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """--device-memory (shared by ``run`` and ``serve``): the budget of the start-up memory plan."""
    parser.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory per GPU (the host's on CPU) the start-up memory plan checks against, in GiB; "
        "default: the GPUs' free memory, or the host's available memory (engine.memory_plan)",
    )


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --vae-checkpoint, --random-weights, --steps, --dtype (shared by run and serve)."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="DiT checkpoint file, or a model bundle directory (model.json + student.safetensors + vae.pth); "
        "default for --preset tiny: the trained toy model shipped in server/weights/tiny",
    )
    parser.add_argument(
        "--vae-checkpoint", default=None, help="VAE checkpoint (default: the bundle's, else seeded random)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random DiT and VAE instead of the trained default (noise; for plumbing tests)",
    )
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="N evenly spaced denoising steps instead of the weights' own (2; benchmarks raise it to make "
        "the score stage heavier)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the score model's transformer blocks (inductor; the first chunks compile, then "
        "agree with eager within float32 rounding)",
    )


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """--vae-autocast / --vae-channels-last / --vae-compile / --vae-chunk-at-once (``run`` and ``serve``)."""
    parser.add_argument(
        "--vae-autocast",
        choices=VAE_AUTOCAST,
        default="auto",
        help="decode under bfloat16 autocast, cache in bf16 (default auto: bfloat16 when --dtype is "
        "bfloat16, i.e. on CUDA; none keeps the VAE's float32; allowed on CPU, where frames differ from "
        "float32 by a few levels)",
    )
    parser.add_argument(
        "--vae-channels-last",
        action="store_true",
        help="VAE weights, activations and cache in channels-last layout (faster cuDNN; on CPU a layout "
        "change only)",
    )
    parser.add_argument(
        "--vae-compile",
        action="store_true",
        help="torch.compile the decoder step (compiles on a session's second chunk; on CPU it needs a C++ "
        "compiler and takes about a minute)",
    )
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument(
        "--vae-chunk-at-once",
        dest="vae_chunk_at_once",
        action="store_true",
        default=False,
        help="one decoder call per chunk instead of one per latent (3x the decode activation memory; on CPU "
        "faster only at small sizes)",
    )
    placement.add_argument(
        "--vae-per-latent",
        dest="vae_chunk_at_once",
        action="store_false",
        help="one decoder call per latent, Wan's loop (the default)",
    )


def decode_settings(args: argparse.Namespace) -> dict[str, object]:
    """The ``vae_*`` option fields from parsed arguments (``add_decode_arguments``)."""
    if args.vae_autocast not in VAE_AUTOCAST:  # a config file's value skips argparse's choices
        raise ValueError(
            f"--vae-autocast must be one of {', '.join(VAE_AUTOCAST)}, got {args.vae_autocast!r}"
        )
    return {
        "vae_autocast": args.vae_autocast,
        "vae_channels_last": bool(args.vae_channels_last),
        "vae_compile": bool(args.vae_compile),
        "vae_chunk_at_once": bool(args.vae_chunk_at_once),
    }


def check_steps(steps: int | None) -> None:
    if steps is not None and not 1 <= steps <= 1000:
        raise ValueError(f"--steps must be between 1 and 1000, got {steps}")


def _size(args: argparse.Namespace, bundle: ModelBundle | None = None) -> tuple[int, int]:
    if args.resolution is not None:
        if args.height is not None or args.width is not None:
            raise ValueError("give either --resolution HxW or --height/--width, not both")
        parts = args.resolution.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--resolution {args.resolution!r} must look like 64x64 (height x width)")
        return int(parts[0]), int(parts[1])
    default = DEFAULT_TINY_SIZE if args.preset == "tiny" else DEFAULT_SIZE
    if bundle is not None:
        default = (bundle.height, bundle.width)
    return args.height or default[0], args.width or default[1]


def default_decoder(device: str, score_workers: int) -> str:
    """Where the decoder goes when ``--decoder`` is not given: its own rank (disaggregated), except on CUDA
    when the GPUs cannot give it one (a one-GPU machine then runs self-contained rather than failing)."""
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < score_workers + 1:
            return "colocated"
    return "dedicated"


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Turn parsed arguments into ``RunOptions``; raises ``ValueError`` with a message for the user."""
    get_model_preset(args.preset)  # an unknown preset raises with the valid names
    weights = resolve_weights(args.preset, args.checkpoint, args.vae_checkpoint, args.random_weights)
    height, width = _size(args, weights.bundle)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    decoder = args.decoder if args.decoder is not None else default_decoder(device, args.score_workers)
    world = args.score_workers + (1 if decoder == "dedicated" else 0)
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // max(world, 1))
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    check_steps(args.steps)
    if args.chunk_timeout <= 0:
        raise ValueError(f"--chunk-timeout must be positive, got {args.chunk_timeout}")
    options = RunOptions(
        image=args.image,
        audio=args.audio,
        out=args.out,
        preset=args.preset,
        score_workers=args.score_workers,
        decoder=decoder,
        seed=args.seed,
        height=height,
        width=width,
        prompt=args.prompt,
        checkpoint=weights.checkpoint,
        vae_checkpoint=weights.vae_checkpoint,
        wav2vec_checkpoint=args.wav2vec_checkpoint,
        clip_checkpoint=args.clip_checkpoint,
        umt5_checkpoint=args.umt5_checkpoint,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        threads=threads,
        steps=args.steps,
        overlap=args.overlap,
        chunk_timeout_s=args.chunk_timeout,
        stats_json=args.stats_json,
        save_frames=args.save_frames,
        max_audio_s=args.max_audio_seconds,
        max_image_pixels=args.max_image_pixels,
        progress=args.progress,
        device_memory_gib=args.device_memory,
        compile_score=args.compile,
        **decode_settings(args),  # type: ignore[arg-type]
        **bundle_settings(weights.bundle),  # type: ignore[arg-type]
    )
    if weights.bundle is None and not args.random_weights:
        options = dataclasses.replace(options, weights=weights.describe())
    options.topology()  # worker count vs heads, decoder placement
    options.stream_config()  # sizes and steps
    get_vae_preset(options.vae_preset)
    return options


def parse_run_options(argv: list[str]) -> RunOptions:
    """Parse ``run``'s arguments inside a rank (they were validated by the CLI already)."""
    parser = build_run_parser(argparse.ArgumentParser(prog="talkingmachines run"))
    return options_from_args(parser.parse_args(argv))


def validate_inputs(options: RunOptions) -> None:
    """Everything that can be checked before the world starts; raises ``ValueError`` with the fix."""
    from frontends.audio_features import AudioFeaturizerConfig

    try:
        audio = load_audio(options.audio, max_seconds=options.max_audio_s)
    except AudioDecodeError as exc:
        raise ValueError(str(exc)) from exc
    sample_rate = AudioFeaturizerConfig().sample_rate
    if audio.size < sample_rate // 16:
        raise ValueError(f"audio file {str(options.audio)!r} holds less than one video frame of audio")
    try:
        load_image(options.image, max_pixels=options.max_image_pixels)
    except ImageDecodeError as exc:
        raise ValueError(str(exc)) from exc
    if not options.out.parent.resolve().is_dir():
        raise ValueError(f"output directory {str(options.out.parent)!r} does not exist — create it first")
    if options.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {str(options.out)!r} must end in .mp4")
    for flag, path in (
        ("--checkpoint", options.checkpoint),
        ("--vae-checkpoint", options.vae_checkpoint),
        ("--wav2vec-checkpoint", options.wav2vec_checkpoint),
        ("--clip-checkpoint", options.clip_checkpoint),
        ("--umt5-checkpoint", options.umt5_checkpoint),
    ):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path!r} does not exist")
    if options.preset != "tiny" and options.checkpoint is None:
        raise ValueError(
            f"preset {options.preset!r} has no trained weights here: pass --checkpoint, or use --preset tiny "
            "(seeded random weights)"
        )
    if options.device == "cuda":
        import torch

        world = options.topology().world_size
        if torch.cuda.device_count() < world:
            raise ValueError(
                f"{options.topology().name!r} needs {world} GPUs, {torch.cuda.device_count()} are visible; "
                "lower --score-workers or use --decoder colocated"
            )
    tokens = (options.height // 16) * (options.width // 16)
    if tokens % options.score_workers:
        raise ValueError(
            f"--score-workers {options.score_workers} does not divide the {tokens} tokens of a latent frame "
            f"at {options.height}x{options.width}; pick a size whose (H/16)·(W/16) it divides"
        )
    if not math.isfinite(options.max_audio_s) or options.max_audio_s <= 0:
        raise ValueError(f"--max-audio-seconds must be positive, got {options.max_audio_s}")
    from engine.memory_plan import check_options_memory

    check_options_memory(options, sessions=1)  # last: it may measure the GPUs

"""The options of a serving group, shared by ``talkingmachines run`` and ``serve``: defined, parsed and
checked once.

``add_group_arguments`` defines the flags both commands accept (preset, topology, size, seed, prompt, the
weights and their precision, the encoders, the decoder options, device, threads, steps, chunk size and
timeout, the memory plan's budget, and the rank options ``--pin-cores``/``--rank-report``);
``group_options`` turns the parsed flags into a ``GroupOptions`` (or a subclass with the command's own
fields: ``server.run_options.RunOptions``, ``server.serve.ServeOptions``) and checks what they share.
Every rank of the world receives the same argument list and parses it the same way, so the master and the
workers agree on the preset, the stream configuration and the seed without another message.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from decoder.streaming import DecodeOptions
from decoder.taehv import VAE_DECODER_CHOICES, check_taehv_checkpoint
from engine.degrade import MODES, DegradeConfig
from frontends.model_bundle import ModelBundle, resolve_weights
from proto.model_config import ModelConfig, get_model_preset, model_preset_names
from proto.step_pipeline import check_step_pipeline
from proto.stream_config import STREAM_SCHEDULES, StreamConfig
from proto.topology import Topology
from proto.vae_config import TINY_DIT_PRESETS, get_vae_preset, vae_preset_for
from workers.fp8 import FP8_CHOICES, KV_CACHE_DTYPES, fp8_supported

# Frame size when --resolution (or --height/--width) is not given and no trained bundle fixes it, for run and
# serve alike: tiny --random-weights at 32x32 keeps up with real time on a CPU core (the random VAE decodes a
# 12-frame chunk in about 0.1 s there, 0.25 s at 64x64, 1.6 s at 128x128); the real presets stream at 512².
DEFAULT_TINY_SIZE = (32, 32)
DEFAULT_SIZE = (512, 512)
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DTYPE_HELP = (
    "precision of the DiT and the CLIP/umT5 encoders (default auto: bfloat16 on CUDA, float32 on CPU). "
    "bfloat16 keeps Wan's float32 islands (time embedding, modulation, norms, head) and float32 latents; "
    "the VAE keeps float32 weights and decodes under bfloat16 autocast (the one-off reference encode stays "
    "float32); wav2vec2 runs on the host CPU in float32 whatever the choice"
)
VAE_AUTOCAST = ("auto", "none", "bfloat16")

# Seconds to wait for a chunk's latent before the score side counts as failed. run streams a file and may
# start with slow first chunks (a cold GPU, --compile); serve must notice a stuck group while calls wait.
CHUNK_TIMEOUT_S = {"run": 60.0, "serve": 10.0}


@dataclass(frozen=True, kw_only=True)
class GroupOptions:
    """Validated options of a serving group (sizes in pixels, times in seconds), the same for every rank.

    Built by ``group_options`` only. The defaults are those of seeded random weights in float32: a trained
    bundle fixes the chunk size, the training window, the steps, the shift and the encoder seed
    (``bundle_settings``), ``dtype`` is ``--dtype`` resolved for the device (``resolve_dtype``) and the
    ``vae_*`` fields are the decoder options (``add_decode_arguments``).
    """

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
    chunk_timeout_s: float
    steps: int | None = None  # --steps: N evenly spaced denoising steps instead of the weights' own
    chunk_latent_frames: int | None = None  # --chunk-frames, else the bundle's, else the schedule's
    device_memory_gib: float | None = None
    pin_cores: tuple[int, ...] | None = None  # --pin-cores: rank r runs on core pin_cores[r % len]
    rank_report: Path | None = None  # --rank-report: each rank writes rank<r>.json there on exit
    dtype: str = "float32"  # "float32" or "bfloat16"
    compile_score: bool = False  # --compile: torch.compile the score model's blocks (StreamingDiT)
    attention_backend: str = "sdpa"  # --attention-backend resolved for the device (workers.attention)
    cuda_graphs: bool = False  # --cuda-graphs: replay each score pass as a CUDA graph (workers.cuda_graphs)
    fp8: str = "off"  # --fp8: "off" or "linear" (W8A8 e4m3 matrix products of the DiT's large linears)
    kv_cache_dtype: str = "auto"  # --kv-cache-dtype: "auto" (the DiT's dtype) or "fp8" (e4m3 + scales)
    # What a trained bundle fixes (None: the model's stream schedule, ``ModelConfig.stream_schedule``).
    train_latent_frames: int | None = None
    default_denoising_steps: tuple[int, ...] | None = None
    timestep_shift: float | None = None
    encoder_seed: int | None = None
    weights: str = "seeded random weights"
    vae_autocast: str = "auto"
    vae_channels_last: bool = False
    vae_compile: bool = False
    vae_chunk_at_once: bool = False
    # --degrade / --degrade-steps / --degrade-enter / --degrade-leave (engine.degrade; serve only)
    degrade: DegradeConfig = dataclasses.field(default_factory=DegradeConfig)
    max_batch_sessions: int = 1  # --max-batch-sessions: sessions' chunks scored in one forward (1: off)
    vae_decoder: str = "wan2.1"  # --vae-decoder: "taew2.1" decodes with decoder.taehv (server.master)
    taehv_checkpoint: str | None = None  # --taehv-checkpoint: taew2_1.pth; None: seeded random (tiny)
    step_pipeline: bool = False  # --step-pipeline: one stage of score_workers ranks per denoising step

    @property
    def model_config(self) -> ModelConfig:
        return get_model_preset(self.preset)

    @property
    def vae_preset(self) -> str:
        """The VAE that matches the DiT preset: the tiny VAE for the CPU-scale presets, Wan 2.1's for the
        real ones (``proto.vae_config.vae_preset_for``)."""
        return vae_preset_for(self.preset)

    def topology(self) -> Topology:
        return Topology(
            score_workers=self.score_workers,
            decoder=self.decoder,  # type: ignore[arg-type]
            device=self.device,  # type: ignore[arg-type]
            num_heads=self.model_config.num_heads,
            preset=self.preset,
            step_stages=self.step_stages,
        )

    @property
    def step_stages(self) -> int:
        """Step-pipeline stages: one per denoising step under ``--step-pipeline``, else 1."""
        return self.stream_config().num_steps if self.step_pipeline else 1

    def stream_config(self) -> StreamConfig:
        """The model's stream schedule (``ModelConfig.stream_schedule``: chunk sizes, steps, window, fps) at
        this size, with what the options override: ``--steps``, and ``--chunk-frames`` and a trained
        bundle's settings where the schedule lets chunk sizes change (not LiveAct's ConvKV window, whose
        chunks are 6 then 8 latent frames by construction)."""
        schedule = self.model_config.stream_schedule
        overrides: dict[str, Any] = {"height": self.height, "width": self.width}
        fixed = {
            "chunk_latent_frames": self.chunk_latent_frames,
            "train_latent_frames": self.train_latent_frames,
            "denoising_steps": self.default_denoising_steps,
            "timestep_shift": self.timestep_shift,
        }
        overrides |= {name: value for name, value in fixed.items() if value is not None}
        if self.steps is not None:
            overrides["denoising_steps"] = evenly_spaced_steps(self.steps)
        if STREAM_SCHEDULES[schedule].get("window") == "convkv-memory":
            resized = [n for n in ("chunk_latent_frames", "train_latent_frames") if n in overrides]
            if resized:
                base = StreamConfig.for_schedule(schedule)
                raise ValueError(
                    f"preset {self.preset!r} streams the {schedule!r} schedule, whose chunks are fixed: "
                    f"{base.frames_in_chunk(0)} latent frames, then {base.frames_in_chunk(1)} in a "
                    f"{base.train_latent_frames}-frame ConvKV window; leave out --chunk-frames (and do not "
                    f"pass a bundle trained on another schedule), got {resized[0]}={overrides[resized[0]]}"
                )
        try:
            return StreamConfig.for_schedule(schedule, **overrides)
        except ValueError as exc:
            raise ValueError(f"preset {self.preset!r}, {schedule!r} schedule: {exc}") from exc

    @property
    def torch_dtype(self) -> torch.dtype:
        """The DiT's and the CLIP/umT5 encoders' dtype (their outputs are float32 on the wire)."""
        return getattr(torch, self.dtype)

    @property
    def vae_autocast_dtype(self) -> torch.dtype | None:
        """The VAE decoder's autocast dtype (``DecodeSession``): its weights stay float32."""
        return torch.bfloat16 if self.dtype == "bfloat16" else None

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

    @property
    def fp8_summary(self) -> str:
        """The FP8 settings for the start-up line, e.g. ``fp8 off, KV cache auto``."""
        linear = "linear (W8A8 e4m3, torch._scaled_mm)" if self.fp8 == "linear" else self.fp8
        kv = "fp8 (e4m3 + per-token-head scales)" if self.kv_cache_dtype == "fp8" else self.kv_cache_dtype
        return f"fp8 {linear}, KV cache {kv}"

    def group_fields(self) -> dict[str, Any]:
        """The ``GroupOptions`` fields of these options (of a subclass too), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GroupOptions)}

    def check_local_devices(self) -> None:
        """On CUDA, this machine must show one GPU per rank (a group launched here, not by torchrun)."""
        if self.device == "cuda":
            world = self.topology().world_size
            if torch.cuda.device_count() < world:
                fix = "lower --score-workers or use --decoder colocated"
                if self.step_pipeline:
                    fix = "lower --score-workers or --steps, or leave out --step-pipeline"
                raise ValueError(
                    f"{self.topology().name!r} needs {world} GPUs, {torch.cuda.device_count()} are visible; "
                    + fix
                )

    def check(self) -> None:
        """What the group's options must satisfy together; raises ``ValueError`` with the fix."""
        self.topology()  # worker count vs heads, decoder placement
        stream = self.stream_config()  # sizes, steps, chunk size vs the training window
        self.degrade.check(len(stream.denoising_steps), stream.window)
        if self.step_pipeline:
            check_step_pipeline(stream, self.step_stages, self.preset)
            if self.degrade.mode != "off":
                raise ValueError(
                    "--degrade steps cannot be combined with --step-pipeline (every stage runs its one "
                    "denoising step of every chunk); leave out one of them"
                )
            if self.max_batch_sessions > 1:
                raise ValueError(
                    "--max-batch-sessions > 1 cannot be combined with --step-pipeline (the stage ranks score "
                    "one chunk at a time); use --max-batch-sessions 1"
                )
        get_vae_preset(self.vae_preset)
        self._check_vae_decoder()
        tokens = (self.height // 16) * (self.width // 16)
        if tokens % self.score_workers:
            raise ValueError(
                f"--score-workers {self.score_workers} does not divide the {tokens} tokens of a latent frame "
                f"at {self.height}x{self.width}; pick a size whose (H/16)·(W/16) it divides"
            )
        for flag, path in (
            ("--checkpoint", self.checkpoint),
            ("--vae-checkpoint", self.vae_checkpoint),
            ("--wav2vec-checkpoint", self.wav2vec_checkpoint),
            ("--clip-checkpoint", self.clip_checkpoint),
            ("--umt5-checkpoint", self.umt5_checkpoint),
            ("--taehv-checkpoint", self.taehv_checkpoint),
        ):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{flag} {path!r} does not exist")
        check_fp8_options(self.fp8, self.kv_cache_dtype, self.device)
        if self.fp8 == "linear" and self.dtype != "bfloat16":
            raise ValueError(
                f"--fp8 linear needs --dtype bfloat16 (the FP8 matrix products write bfloat16 for the "
                f"layers around them), got --dtype {self.dtype}; leave --dtype at auto on CUDA"
            )
        if self.preset not in TINY_DIT_PRESETS and self.checkpoint is None:
            raise ValueError(
                f"preset {self.preset!r} has no trained weights here: pass --checkpoint, or use one of the "
                f"CPU-scale presets {', '.join(TINY_DIT_PRESETS)} (seeded random weights)"
            )

    def _check_vae_decoder(self) -> None:
        """--vae-decoder / --taehv-checkpoint: known decoder, weights for a real preset, no stray path."""
        if self.vae_decoder not in VAE_DECODER_CHOICES:
            raise ValueError(
                f"--vae-decoder must be one of {', '.join(VAE_DECODER_CHOICES)}, got {self.vae_decoder!r}"
            )
        if self.vae_decoder != "taew2.1":
            if self.taehv_checkpoint is not None:
                raise ValueError("--taehv-checkpoint is the weights of --vae-decoder taew2.1; add that flag")
            return
        if self.taehv_checkpoint is None and self.preset not in TINY_DIT_PRESETS:
            raise ValueError(
                f"--vae-decoder taew2.1 on preset {self.preset!r} needs its weights: download taew2_1.pth "
                "from github.com/madebyollin/taehv and pass --taehv-checkpoint PATH (random weights are for "
                f"the CPU-scale presets {', '.join(TINY_DIT_PRESETS)} only)"
            )
        if self.vae_compile:
            raise ValueError("--vae-compile compiles the Wan VAE's decoder step; leave it out with taew2.1")
        if self.taehv_checkpoint is not None and Path(self.taehv_checkpoint).exists():
            check_taehv_checkpoint(self.taehv_checkpoint)  # keys and shapes now, not after the ranks start


Options = TypeVar("Options", bound=GroupOptions)


def group_options(args: argparse.Namespace, cls: type[Options], **own: Any) -> Options:
    """Build ``cls`` (``GroupOptions`` or a subclass) from the group flags of ``args`` plus the command's
    ``own`` fields, and check what the group's options must satisfy; raises ``ValueError`` with a message
    for the user. The one place where the flags ``add_group_arguments`` defines are read."""
    get_model_preset(args.preset)  # an unknown preset raises with the valid names
    weights = resolve_weights(args.preset, args.checkpoint, args.vae_checkpoint, args.random_weights)
    height, width = _size(args, weights.bundle)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    step_pipeline = bool(getattr(args, "step_pipeline", False))
    decoder = args.decoder if args.decoder is not None else default_decoder(device, args.score_workers)
    if step_pipeline and args.decoder is None:
        decoder = "dedicated"  # the only placement it supports (proto.topology); an explicit one is checked
    world = args.score_workers + (1 if decoder == "dedicated" else 0)
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // max(world, 1))
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be between 1 and 1000, got {args.steps}")
    if args.chunk_timeout <= 0:
        raise ValueError(f"--chunk-timeout must be positive, got {args.chunk_timeout}")
    fixed = bundle_settings(weights.bundle)  # what a trained bundle fixes, its chunk size included
    if args.chunk_frames is not None:
        fixed["chunk_latent_frames"] = args.chunk_frames
    options = cls(
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
        threads=threads,
        chunk_timeout_s=args.chunk_timeout,
        steps=args.steps,
        device_memory_gib=args.device_memory,
        pin_cores=parse_cores(args.pin_cores),
        rank_report=None if args.rank_report is None else Path(args.rank_report),
        dtype=resolve_dtype(str(args.dtype), device),
        compile_score=bool(args.compile),
        **_speed_settings(args, device, resolve_dtype(str(args.dtype), device)),
        fp8=str(args.fp8),
        kv_cache_dtype=str(args.kv_cache_dtype),
        step_pipeline=step_pipeline,
        weights=weights.describe(),
        **_decode_settings(args),
        degrade=degrade_config(args),
        max_batch_sessions=_max_batch_sessions(args),
        **fixed,
        **own,
    )
    if step_pipeline and args.threads is None:  # cores / ranks for the pipeline's 1 + steps x N ranks
        world = options.topology().world_size
        options = dataclasses.replace(options, threads=max(1, (os.cpu_count() or 1) // world))
    options.check()
    return options


def degrade_config(args: argparse.Namespace) -> DegradeConfig:
    """``--degrade*`` as an ``engine.degrade.DegradeConfig`` (checked against the schedule in ``check``)."""
    return DegradeConfig(
        mode=str(args.degrade),
        steps=int(args.degrade_steps),
        enter_s=float(args.degrade_enter),
        leave_s=float(args.degrade_leave),
    )


def check_fp8_options(fp8: str, kv_cache_dtype: str, device: str) -> None:
    """``--fp8`` / ``--kv-cache-dtype`` values, and ``--fp8 linear`` only where FP8 matrix products run.

    Refused here (before any rank starts or loads weights): ``--fp8 linear`` on ``--device cpu`` and on CUDA
    when no GPU is visible. The GPU's compute capability (>= 8.9) is checked by every score rank before it
    loads weights (``server.rank_main.build_score_rank``), so this process holds no CUDA context (as
    ``engine.memory_plan`` measures free memory in a child process). ``--kv-cache-dtype fp8`` is storage only
    and runs on every device."""
    if fp8 not in FP8_CHOICES:
        raise ValueError(f"--fp8 must be one of {', '.join(FP8_CHOICES)}, got {fp8!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        choices = ", ".join(KV_CACHE_DTYPES)
        raise ValueError(f"--kv-cache-dtype must be one of {choices}, got {kv_cache_dtype!r}")
    if fp8 == "linear" and (device != "cuda" or not torch.cuda.is_available()):
        _, reason = fp8_supported(device)
        raise ValueError(f"--fp8 linear is not available here: {reason}; run without --fp8 (or --fp8 off)")


def evenly_spaced_steps(n: int) -> tuple[int, ...]:
    """N steps spread evenly over (0, 1000], starting at pure noise: 1000, 1000 - 1000/N, …"""
    return tuple(sorted({round(1000 - 1000 * i / n) for i in range(n)}, reverse=True))


def bundle_settings(bundle: ModelBundle | None) -> dict[str, Any]:
    """The option fields a trained bundle fixes (empty without one)."""
    if bundle is None:
        return {}
    return {
        "train_latent_frames": bundle.train_latent_frames,
        "chunk_latent_frames": bundle.chunk_latent_frames,
        "default_denoising_steps": bundle.denoising_steps,
        "timestep_shift": bundle.timestep_shift,
        "encoder_seed": bundle.encoder_seed,
    }


def resolve_dtype(choice: str, device: str) -> str:
    """``--dtype`` for ``device``: ``auto`` is bfloat16 on CUDA (an 18B DiT in float32 needs ~72 GB for its
    weights alone) and float32 on the CPU; ``ValueError`` for anything not in ``DTYPE_CHOICES`` (a config
    file's value bypasses argparse's check)."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {choice!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if choice == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return choice


def default_decoder(device: str, score_workers: int) -> str:
    """Where the decoder goes when ``--decoder`` is not given: its own rank (disaggregated), except on CUDA
    when the GPUs cannot give it one (a one-GPU machine then runs self-contained rather than failing)."""
    if device == "cuda" and torch.cuda.device_count() < score_workers + 1:
        return "colocated"
    return "dedicated"


def parse_cores(spec: object) -> tuple[int, ...] | None:
    """``--pin-cores "0,1"`` (or a config file's list ``[0, 1]``) as core numbers; None for none."""
    if spec is None:
        return None
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        cores = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        cores = ()
    if not cores or min(cores) < 0:
        raise ValueError(f"--pin-cores {spec!r} must be comma-separated core numbers, like 0,1")
    return cores


def _size(args: argparse.Namespace, bundle: ModelBundle | None) -> tuple[int, int]:
    if args.resolution is not None:
        if args.height is not None or args.width is not None:
            raise ValueError("give either --resolution HxW or --height/--width, not both")
        parts = str(args.resolution).lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--resolution {args.resolution!r} must look like 64x64 (height x width)")
        return int(parts[0]), int(parts[1])
    default = DEFAULT_TINY_SIZE if args.preset in TINY_DIT_PRESETS else DEFAULT_SIZE
    if bundle is not None:
        default = (bundle.height, bundle.width)
    return args.height or default[0], args.width or default[1]


def _speed_settings(args: argparse.Namespace, device: str, dtype: str) -> dict[str, Any]:
    """``attention_backend`` (``--attention-backend`` resolved for this device, dtype and the preset's head
    dim; ``auto`` pinned to its choice) and ``cuda_graphs`` (``--cuda-graphs``, refused where it cannot run);
    ``ValueError`` with the fix otherwise."""
    from workers.attention import resolve_attention_backend
    from workers.cuda_graphs import check_cuda_graphs

    config = get_model_preset(args.preset)
    name = getattr(args, "attention_backend", None) or os.environ.get("TM_ATTENTION_BACKEND", "auto")
    backend = resolve_attention_backend(str(name), device, getattr(torch, dtype), config.head_dim)
    cuda_graphs = bool(getattr(args, "cuda_graphs", False))
    if cuda_graphs:
        check_cuda_graphs(device, args.score_workers)
    return {"attention_backend": backend, "cuda_graphs": cuda_graphs}


def _max_batch_sessions(args: argparse.Namespace) -> int:
    """``--max-batch-sessions`` (1 when the namespace has no such flag), at least 1."""
    value = getattr(args, "max_batch_sessions", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"--max-batch-sessions must be an integer >= 1 (1: every chunk scored alone), got {value!r}"
        )
    return value


def _decode_settings(args: argparse.Namespace) -> dict[str, Any]:
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
        "vae_decoder": str(args.vae_decoder),
        "taehv_checkpoint": args.taehv_checkpoint,
    }


# ---- the flags ------------------------------------------------------------------------------------------


def add_group_arguments(parser: argparse.ArgumentParser, command: str, prompt_help: str) -> None:
    """What ``run`` and ``serve`` share, defined once: the serving group (preset, topology, device, threads),
    its size, seed and prompt, the stream (steps, chunk size, chunk timeout), the weights and their
    precision (``add_weights_arguments``), the encoders, the decoder options (``add_decode_arguments``), the
    memory plan's budget and the rank options (``add_rank_arguments``). The commands differ only in what is
    theirs (inputs and outputs for ``run``; the API for ``serve``) and in ``--chunk-timeout``'s default
    (``CHUNK_TIMEOUT_S``)."""
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
    parser.add_argument(
        "--step-pipeline",
        action="store_true",
        help="step-pipeline parallelism: one stage of --score-workers ranks per denoising step, each with "
        "its own step's KV cache, chunks handed stage to stage (up to one chunk in flight per stage: "
        "throughput up to steps x, latency still a full pass); 1 + steps x score-workers ranks, --decoder "
        "dedicated, per-step cache mode, the sparse-causal window (not SoulX-LiveAct)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise and random-weight seed")
    parser.add_argument(
        "--resolution",
        default=None,
        help="HxW in pixels, multiples of 16 (default: a trained bundle's training size, 64x64 for the "
        f"tiny default; {tiny_h}x{tiny_w} for tiny --random-weights; "
        f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]} otherwise)",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (instead of --resolution)")
    parser.add_argument("--width", type=int, default=None, help="pixels (instead of --resolution)")
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
        "--chunk-frames",
        type=int,
        default=None,
        metavar="N",
        help="latent frames per chunk (4N video frames, 4N - 3 for the first chunk); default: a trained "
        f"bundle's, else the preset's stream schedule's ({StreamConfig.chunk_latent_frames} for the "
        "TalkingMachines presets; the training window must hold a multiple of it); SoulX-LiveAct's chunks "
        "are fixed (6, then 8) and refuse it",
    )
    parser.add_argument(
        "--chunk-timeout",
        type=float,
        default=CHUNK_TIMEOUT_S[command],
        help=f"seconds to wait for a chunk's latent (default for {command}: {CHUNK_TIMEOUT_S[command]:g})",
    )
    parser.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory per GPU (the host's on CPU) the start-up memory plan checks against, in GiB; "
        "default: the GPUs' free memory, or the host's available memory (engine.memory_plan)",
    )
    add_rank_arguments(parser)
    add_degrade_arguments(parser)
    add_batch_arguments(parser)


def add_degrade_arguments(parser: argparse.ArgumentParser) -> None:
    """--degrade / --degrade-steps / --degrade-enter / --degrade-leave (``engine.degrade``)."""
    defaults = DegradeConfig()
    parser.add_argument(
        "--degrade",
        choices=MODES,
        default=defaults.mode,
        help="deadline-aware degradation (serve; run accepts and ignores it, a file has no playout "
        "deadline): 'steps' gives a live session's next chunk fewer denoising steps while its slack "
        "(playout buffer minus the expected time of a full chunk) is negative; default off (unmeasured on "
        "a GPU; the sparse-causal window only)",
    )
    parser.add_argument(
        "--degrade-steps",
        type=int,
        default=defaults.steps,
        metavar="K",
        help=f"denoising steps of a degraded chunk, fewer than the schedule's (default {defaults.steps}: "
        "one step from pure noise; K >= 2 keeps the first and the last step, evenly spaced between)",
    )
    parser.add_argument(
        "--degrade-enter",
        type=float,
        default=defaults.enter_s,
        metavar="S",
        help=f"degrade when the slack drops below -S seconds (default {defaults.enter_s:g})",
    )
    parser.add_argument(
        "--degrade-leave",
        type=float,
        default=defaults.leave_s,
        metavar="S",
        help=f"back to full quality when the slack rises above S seconds (default {defaults.leave_s:g}; "
        "must be reachable: below --ahead minus a full chunk's time, or a degraded session stays degraded)",
    )


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-batch-sessions: batched sessions on the score side (``workers.batched``, ``engine.batching``)."""
    parser.add_argument(
        "--max-batch-sessions",
        type=int,
        default=1,
        metavar="N",
        help="score the chunks of up to N due sessions in one DiT forward when that keeps every session's "
        "deadline (engine.scheduler.pick_batch, from the engine's measured chunk costs); default 1: every "
        "chunk alone (batching is not yet measured on a GPU)",
    )


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """--pin-cores / --rank-report: how each rank runs and what it reports (``server.rank_report``)."""
    parser.add_argument(
        "--pin-cores",
        default=None,
        metavar="CORES",
        help="pin rank r to core CORES[r mod len] (e.g. 0,1) before torch starts its threads, so ranks on "
        "one machine do not share cores (benchmarks; CPU serving)",
    )
    parser.add_argument(
        "--rank-report",
        type=Path,
        default=None,
        metavar="DIR",
        help="each rank writes DIR/rank<r>.json on exit: role, cores, threads, peak RSS, peak CUDA "
        "allocation, DiT forwards, wall/CPU/run-queue seconds and the memory plan's figures for it",
    )


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --vae-checkpoint, --random-weights, --dtype, --steps, --compile, and the score model's
    speed options (``add_speed_arguments``: --attention-backend, --cuda-graphs, --fp8, --kv-cache-dtype)."""
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
    add_speed_arguments(parser)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """--attention-backend / --cuda-graphs / --fp8 / --kv-cache-dtype: how the score model's passes run
    (workers.attention, workers.cuda_graphs, workers.fp8); the first two change nothing beyond the dtype's
    rounding, FP8 changes the latents by its own rounding (python -m workers.fp8_check measures it)."""
    from workers.attention import BACKENDS

    parser.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default=None,
        help="attention kernel of the DiT (default: $TM_ATTENTION_BACKEND, else auto = fa3 on Hopper if "
        "installed, else fa2 (flash-attn) if installed, else sdpa; cudnn = PyTorch SDPA restricted to cuDNN, "
        "opt-in; flash = fa2). A backend this device cannot run is refused at start-up; calls its kernel "
        "cannot take (masks, float32, head dims > 256) run through sdpa",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture each fixed-shape score pass as a CUDA graph after one eager warm-up and replay it "
        "(on top of --compile when both are given); CUDA and one score worker only, refused otherwise; "
        "a failed capture is logged once and the passes run eager. Off by default (unmeasured on a GPU)",
    )
    parser.add_argument(
        "--fp8",
        choices=FP8_CHOICES,
        default="off",
        help="linear: FP8 (e4m3) weights and activations in the DiT's attention projections and FFNs, "
        "matrix products in torch._scaled_mm (CUDA GPUs of compute capability >= 8.9 only; refused "
        "elsewhere); embeddings, modulation, norms and head stay in --dtype. Unmeasured on a GPU; check the "
        "latent difference first with python -m workers.fp8_check (default off)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="self-attention KV cache storage: auto = --dtype; fp8 = e4m3 with one float32 scale per "
        "token and head, dequantised when attention reads it (about half the bytes of bf16; any device)",
    )


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """--vae-autocast / --vae-channels-last / --vae-compile / --vae-chunk-at-once / --vae-per-latent /
    --vae-decoder / --taehv-checkpoint."""
    parser.add_argument(
        "--vae-decoder",
        choices=VAE_DECODER_CHOICES,
        default="wan2.1",
        help="what turns latents into frames: wan2.1, the Wan VAE (default), or taew2.1, the tiny streaming "
        "decoder of madebyollin/taehv (9.8M parameters, 25x fewer FLOPs, lower quality, not measured on this "
        "model yet; the Wan VAE still encodes the reference image). --vae-autocast, --vae-channels-last and "
        "--vae-chunk-at-once apply to either",
    )
    parser.add_argument(
        "--taehv-checkpoint",
        default=None,
        metavar="PATH",
        help="taew2_1.pth or taew2_1.safetensors (github.com/madebyollin/taehv) for --vae-decoder taew2.1; "
        "default: seeded random weights, tiny presets only",
    )
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

"""Model bundles: a trained DiT + VAE with the settings they were trained for, loaded as one unit.

A bundle is a directory:

    model.json           preset, vae_preset, height, width, train_latent_frames, chunk_latent_frames,
                         denoising_steps, timestep_shift, encoder_seed, prompt, and a free-form "training"
                         record (commands, commit, evaluation numbers)
    student.safetensors  the score model (Wan layout; ``--checkpoint`` loads it)
    vae.pth              the VAE (Wan layout; ``--vae-checkpoint`` loads it)

`training.run --stage all` writes one (``OUT/bundle``); the package ships the toy-scale one trained by that
command as the default of the ``tiny`` preset (``server/weights/tiny``), so ``talkingmachines run`` and
``serve`` show a character that talks instead of noise. ``--random-weights`` restores the seeded random
weights (what the distributed-equivalence tests need no training for).

Why the settings travel with the weights: a student trained on 33-frame clips (9 latent frames) must stream
with ``train_latent_frames=9`` (the window its positions and I2V conditioning cover); the tiny random text,
image and audio encoders it was trained against are seeded, and must be built with the training seed, not
the run's noise seed; and it was trained at one resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_JSON = "model.json"
DIT_FILE = "student.safetensors"
VAE_FILE = "vae.pth"
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent.parent / "server" / "weights" / "tiny"
"""The trained toy-scale default shipped with the package (used for ``--preset tiny``)."""

_REQUIRED = ("preset", "vae_preset", "height", "width", "train_latent_frames", "chunk_latent_frames")


class BundleError(ValueError):
    """A bundle directory that is missing files or whose model.json is unusable."""


@dataclass(frozen=True)
class ModelBundle:
    """A loaded bundle's settings and file paths."""

    path: Path
    preset: str
    vae_preset: str
    height: int
    width: int
    train_latent_frames: int
    chunk_latent_frames: int
    denoising_steps: tuple[int, ...] = (1000, 500)
    timestep_shift: float = 5.0
    encoder_seed: int = 0
    prompt: str = "a person talking"
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def dit(self) -> Path:
        return self.path / DIT_FILE

    @property
    def vae(self) -> Path:
        return self.path / VAE_FILE

    def describe(self) -> str:
        return (
            f"trained bundle {self.path} ({self.preset}, {self.height}x{self.width}, "
            f"{self.train_latent_frames}-latent training clips)"
        )


def is_bundle(path: str | Path) -> bool:
    """True for a directory holding a model.json."""
    return Path(path).is_dir() and (Path(path) / MODEL_JSON).is_file()


def load_bundle(path: str | Path) -> ModelBundle:
    """Read and check a bundle directory; BundleError names what is wrong."""
    root = Path(path)
    meta_path = root / MODEL_JSON
    if not meta_path.is_file():
        raise BundleError(f"{root} is not a model bundle: it has no {MODEL_JSON}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"{meta_path} lacks {missing}")
    for name in (DIT_FILE, VAE_FILE):
        if not (root / name).is_file():
            raise BundleError(f"model bundle {root} lacks {name}")
    try:
        bundle = ModelBundle(
            path=root,
            preset=str(meta["preset"]),
            vae_preset=str(meta["vae_preset"]),
            height=int(meta["height"]),
            width=int(meta["width"]),
            train_latent_frames=int(meta["train_latent_frames"]),
            chunk_latent_frames=int(meta["chunk_latent_frames"]),
            denoising_steps=tuple(int(s) for s in meta.get("denoising_steps", (1000, 500))),
            timestep_shift=float(meta.get("timestep_shift", 5.0)),
            encoder_seed=int(meta.get("encoder_seed", 0)),
            prompt=str(meta.get("prompt", "a person talking")),
            training=dict(meta.get("training", {})),
        )
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: bad value: {exc}") from exc
    if bundle.train_latent_frames % bundle.chunk_latent_frames:
        raise BundleError(
            f"{meta_path}: train_latent_frames={bundle.train_latent_frames} is not a multiple of "
            f"chunk_latent_frames={bundle.chunk_latent_frames}"
        )
    return bundle


def write_bundle(
    out: str | Path, *, dit: str | Path, vae: str | Path, settings: dict[str, Any]
) -> ModelBundle:
    """Create a bundle directory from a DiT and a VAE checkpoint and its settings (model.json fields)."""
    import shutil

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dit, root / DIT_FILE)
    shutil.copyfile(vae, root / VAE_FILE)
    (root / MODEL_JSON).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return load_bundle(root)


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a run's weights come from: checkpoint paths (None = seeded random) and the bundle, if any."""

    checkpoint: str | None
    vae_checkpoint: str | None
    bundle: ModelBundle | None

    def describe(self) -> str:
        if self.bundle is not None:
            return self.bundle.describe()
        if self.checkpoint is None:
            return "seeded random weights (--random-weights)"
        return f"DiT {self.checkpoint}, VAE {self.vae_checkpoint or 'seeded random'}"


def resolve_weights(
    preset: str, checkpoint: str | None, vae_checkpoint: str | None, random_weights: bool
) -> ResolvedWeights:
    """Apply the default-weights rule shared by ``run`` and ``serve``.

    - ``--random-weights``: seeded random DiT and VAE (not with ``--checkpoint``/``--vae-checkpoint``);
    - ``--checkpoint DIR`` where DIR is a bundle: its DiT, its VAE (unless ``--vae-checkpoint``) and its
      settings;
    - ``--checkpoint FILE``: that DiT; the VAE from ``--vae-checkpoint`` or seeded random;
    - nothing, preset ``tiny``: the shipped trained bundle (``server/weights/tiny``).
    Raises ValueError (with the fix) on a conflicting combination or a broken bundle.
    """
    if random_weights:
        if checkpoint is not None or vae_checkpoint is not None:
            raise ValueError("--random-weights cannot be combined with --checkpoint or --vae-checkpoint")
        return ResolvedWeights(None, None, None)
    bundle_dir: Path | None = None
    if checkpoint is not None and is_bundle(checkpoint):
        bundle_dir = Path(checkpoint)
    elif checkpoint is None and preset == "tiny":
        if not is_bundle(DEFAULT_BUNDLE_DIR):
            raise ValueError(
                f"the trained tiny default is missing ({DEFAULT_BUNDLE_DIR}); reinstall the package, "
                "pass --checkpoint, or use --random-weights"
            )
        bundle_dir = DEFAULT_BUNDLE_DIR
    if bundle_dir is None:
        return ResolvedWeights(checkpoint, vae_checkpoint, None)
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise ValueError(str(exc)) from exc
    if bundle.preset != preset:
        raise ValueError(
            f"{bundle.path} holds a {bundle.preset!r} model but --preset is {preset!r}; pass --preset "
            f"{bundle.preset}"
        )
    return ResolvedWeights(str(bundle.dit), vae_checkpoint or str(bundle.vae), bundle)

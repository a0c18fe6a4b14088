"""Model bundles and the default-weights rule shared by ``run`` and ``serve``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from frontends.model_bundle import (
    DEFAULT_BUNDLE_DIR,
    BundleError,
    is_bundle,
    load_bundle,
    resolve_weights,
)
from server.run_options import build_run_parser, options_from_args


def _run_options(tmp_path: Path, *extra: str):
    import argparse

    parser = build_run_parser(argparse.ArgumentParser())
    argv = ["--image", "a.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    return options_from_args(parser.parse_args([*argv, *extra]))


def test_the_package_ships_a_loadable_tiny_default() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    assert bundle.preset == "tiny" and bundle.vae_preset == "tiny"
    assert bundle.dit.is_file() and bundle.vae.is_file()
    assert bundle.train_latent_frames % bundle.chunk_latent_frames == 0
    total = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.iterdir())
    assert total <= 20 * 1024 * 1024, f"the default is {total} bytes, over the 20 MB budget"


def test_run_uses_the_trained_default_with_its_settings(tmp_path: Path) -> None:
    options = _run_options(tmp_path, "--seed", "9")
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    assert options.checkpoint == str(bundle.dit) and options.vae_checkpoint == str(bundle.vae)
    assert (options.height, options.width) == (bundle.height, bundle.width)
    stream = options.stream_config()
    assert stream.train_latent_frames == bundle.train_latent_frames
    assert stream.denoising_steps == bundle.denoising_steps
    assert options.tiny_encoder_seed == bundle.encoder_seed and options.seed == 9
    assert "trained bundle" in options.weights


def test_random_weights_keep_the_old_behaviour(tmp_path: Path) -> None:
    options = _run_options(tmp_path, "--random-weights", "--seed", "4")
    assert options.checkpoint is None and options.vae_checkpoint is None
    assert (options.height, options.width) == (32, 32)
    assert options.stream_config().train_latent_frames == 21 and options.tiny_encoder_seed == 4


def test_an_explicit_size_and_step_count_override_the_bundle(tmp_path: Path) -> None:
    options = _run_options(tmp_path, "--resolution", "32x48", "--steps", "4")
    assert (options.height, options.width) == (32, 48)
    assert options.stream_config().denoising_steps == (1000, 750, 500, 250)


def test_random_weights_and_a_checkpoint_conflict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--random-weights cannot be combined"):
        _run_options(tmp_path, "--random-weights", "--checkpoint", str(DEFAULT_BUNDLE_DIR))


def test_a_bundle_directory_is_accepted_as_checkpoint(tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["height"], meta["width"] = 48, 32
    (copy / "model.json").write_text(json.dumps(meta))
    options = _run_options(tmp_path, "--checkpoint", str(copy))
    assert options.checkpoint == str(copy / "student.safetensors")
    assert (options.height, options.width) == (48, 32)


def test_a_bundle_for_another_preset_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["preset"] = "wan2.1-i2v-14b"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds a 'wan2\.1-i2v-14b' model but --preset is 'tiny'"):
        resolve_weights("tiny", str(copy), None, False)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "vae.pth").unlink(), "lacks vae.pth"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.json").write_text('{"preset": "tiny"}'), "lacks \\['vae_preset'"),
        (
            lambda d: (d / "model.json").write_text(
                json.dumps({**json.loads((d / "model.json").read_text()), "train_latent_frames": 10})
            ),
            "not a multiple of chunk_latent_frames",
        ),
    ],
)
def test_a_broken_bundle_is_named(tmp_path: Path, breakage, message) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, copy)
    breakage(copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_a_plain_file_is_not_a_bundle(tmp_path: Path) -> None:
    assert not is_bundle(DEFAULT_BUNDLE_DIR / "student.safetensors")
    resolved = resolve_weights("tiny", str(DEFAULT_BUNDLE_DIR / "student.safetensors"), None, False)
    assert resolved.bundle is None and resolved.vae_checkpoint is None

"""Checkpoint loading and saving in Wan's layout (workers/checkpoint.py), on the tiny preset in float32."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from proto.model_config import get_model_preset
from workers.audio import AudioConditioning
from workers.checkpoint import CheckpointError, is_audio_key, load_dit_checkpoint, save_dit_checkpoint
from workers.model import WanModel

TINY = get_model_preset("tiny")


def _random_model(seed: int) -> WanModel:
    """Tiny model with every tensor random and non-zero (audio, head and silence embedding included)."""
    torch.manual_seed(seed)
    model = WanModel(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    frames, height, width = 3, 8, 8
    audio_cfg = TINY.audio
    assert audio_cfg is not None
    return {
        "x": torch.randn(1, TINY.out_dim, frames, height, width, generator=g),
        "t": torch.tensor([700.0]),
        "context": torch.randn(1, TINY.text_len, TINY.text_dim, generator=g),
        "clip_fea": torch.randn(1, TINY.clip_tokens, TINY.clip_dim, generator=g),
        "y": torch.randn(1, TINY.in_dim - TINY.out_dim, frames, height, width, generator=g),
        "audio": AudioConditioning(
            features=torch.randn(
                1,
                1,
                frames + audio_cfg.window - 1,
                audio_cfg.frames_per_latent,
                audio_cfg.wav2vec_layers,
                audio_cfg.wav2vec_dim,
                generator=g,
            ),
            speaking=torch.ones(1, 1, frames, dtype=torch.bool),
        ),
    }


def _run(model: WanModel, **overrides: object) -> torch.Tensor:
    kwargs = _inputs() | overrides
    x, t = kwargs.pop("x"), kwargs.pop("t")
    with torch.no_grad():
        return model(x, t, **kwargs)


@pytest.fixture(scope="module")
def source() -> WanModel:
    return _random_model(seed=1)


@pytest.fixture(scope="module")
def reference_output(source: WanModel) -> torch.Tensor:
    return _run(source)


def test_single_safetensors_file_round_trips_to_identical_outputs(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    path = save_dit_checkpoint(source, tmp_path / "dit.safetensors")
    model, report = load_dit_checkpoint(path, TINY)
    assert torch.equal(_run(model), reference_output)
    assert report.zero_initialised == ()
    assert report.loaded == len(source.state_dict())
    assert report.wrapper is None and report.stripped_prefix == ""


def test_model_prefix_of_causal_students_is_stripped(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    path = save_dit_checkpoint(source, tmp_path / "student.safetensors", prefix="model.")
    model, report = load_dit_checkpoint(path, TINY)
    assert torch.equal(_run(model), reference_output)
    assert report.stripped_prefix == "model."


def test_generator_ema_wrapper_is_preferred_and_generator_selectable(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    other = _random_model(seed=2)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(
        {
            "generator": {"model." + k: v for k, v in other.state_dict().items()},
            "generator_ema": {"model." + k: v for k, v in source.state_dict().items()},
        },
        path,
    )
    ema, ema_report = load_dit_checkpoint(path, TINY)
    raw, raw_report = load_dit_checkpoint(path, TINY, prefer="generator")
    assert torch.equal(_run(ema), reference_output)
    assert torch.equal(_run(raw), _run(other))
    assert (ema_report.wrapper, raw_report.wrapper) == ("generator_ema", "generator")


def test_flat_pt_file_round_trips_to_identical_outputs(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    path = save_dit_checkpoint(source, tmp_path / "dit.pth")
    model, _ = load_dit_checkpoint(path, TINY)
    assert torch.equal(_run(model), reference_output)


def test_sharded_safetensors_with_index_round_trip_by_index_and_by_directory(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    index = save_dit_checkpoint(source, tmp_path / "wan", shards=3)
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    assert len(list((tmp_path / "wan").glob("diffusion_pytorch_model-*-of-00003.safetensors"))) == 3
    by_index, report = load_dit_checkpoint(index, TINY)
    by_dir, _ = load_dit_checkpoint(tmp_path / "wan", TINY)
    assert len(report.files) == 3
    assert torch.equal(_run(by_index), reference_output)
    assert torch.equal(_run(by_dir), reference_output)


def test_mis_shaped_key_error_names_key_both_shapes_and_preset(tmp_path: Path, source: WanModel) -> None:
    state = dict(source.state_dict())
    state["blocks.1.cross_attn.k_img.weight"] = torch.zeros(64, 32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dit_checkpoint(tmp_path / "bad.safetensors", TINY)
    message = str(err.value)
    assert "blocks.1.cross_attn.k_img.weight has shape [64, 32], the preset expects [128, 128]" in message
    assert "fits preset 'tiny'" in message


def test_checkpoint_of_another_preset_names_the_preset_it_looks_like(
    tmp_path: Path, source: WanModel
) -> None:
    path = save_dit_checkpoint(source, tmp_path / "tiny.safetensors")
    wide = dataclasses.replace(TINY, name="tiny-wide", dim=256, ffn_dim=512)
    with pytest.raises(CheckpointError) as err:
        load_dit_checkpoint(path, wide)
    message = str(err.value)
    assert "blocks.0.self_attn.k.weight has shape [128, 128], the preset expects [256, 256]" in message
    assert "looks like preset 'tiny', not 'tiny-wide' — wrong preset?" in message


def test_unexpected_key_is_an_error_naming_it(tmp_path: Path, source: WanModel) -> None:
    state = dict(source.state_dict()) | {"blocks.0.self_attn.extra.weight": torch.zeros(3)}
    save_file(state, str(tmp_path / "extra.safetensors"))
    expected = r"unexpected key blocks\.0\.self_attn\.extra\.weight with shape \[3\]"
    with pytest.raises(CheckpointError, match=expected):
        load_dit_checkpoint(tmp_path / "extra.safetensors", TINY)


def test_missing_non_audio_key_is_an_error_naming_it(tmp_path: Path, source: WanModel) -> None:
    state = {k: v for k, v in source.state_dict().items() if k != "blocks.1.ffn.2.bias"}
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks key blocks\.1\.ffn\.2\.bias \(shape \[128\]"):
        load_dit_checkpoint(tmp_path / "missing.safetensors", TINY)


def test_checkpoint_without_audio_zero_initialises_and_reports_audio_layers(
    tmp_path: Path, source: WanModel
) -> None:
    state = {k: v for k, v in source.state_dict().items() if not is_audio_key(k)}
    audio_keys = sorted(k for k in source.state_dict() if is_audio_key(k))
    save_file(state, str(tmp_path / "wan.safetensors"))
    model, report = load_dit_checkpoint(tmp_path / "wan.safetensors", TINY)
    assert report.zero_initialised == tuple(audio_keys)
    loaded = model.state_dict()
    assert all(not loaded[k].any() for k in audio_keys)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # Zero audio layers make the model plain Wan: the audio input has no effect.
    assert torch.equal(_run(model), _run(model, audio=None))


def test_checkpoint_with_only_part_of_the_audio_layers_is_an_error(tmp_path: Path, source: WanModel) -> None:
    state = {k: v for k, v in source.state_dict().items() if k != "blocks.1.cross_attn.v_audio.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks key blocks\.1\.cross_attn\.v_audio\.weight"):
        load_dit_checkpoint(tmp_path / "partial.safetensors", TINY)


def test_strict_audio_rejects_a_checkpoint_without_audio_layers(tmp_path: Path, source: WanModel) -> None:
    state = {k: v for k, v in source.state_dict().items() if not is_audio_key(k)}
    save_file(state, str(tmp_path / "wan.safetensors"))
    with pytest.raises(CheckpointError, match="audio_proj"):
        load_dit_checkpoint(tmp_path / "wan.safetensors", TINY, strict_audio=True)


def test_bf16_load_casts_every_tensor(tmp_path: Path, source: WanModel) -> None:
    path = save_dit_checkpoint(source, tmp_path / "dit.safetensors")
    model, report = load_dit_checkpoint(path, TINY, dtype=torch.bfloat16)
    assert report.source_dtypes == ("float32",) and report.dtype == "bfloat16"
    loaded = model.state_dict()
    assert {t.dtype for t in loaded.values()} == {torch.bfloat16}
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in source.state_dict().items())


def test_a_missing_shard_of_an_index_is_named(tmp_path: Path, source: WanModel) -> None:
    save_dit_checkpoint(source, tmp_path / "wan", shards=3)
    missing = sorted((tmp_path / "wan").glob("diffusion_pytorch_model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {missing.name}, which does not exist"):
        load_dit_checkpoint(tmp_path / "wan", TINY)


def test_a_published_config_json_of_another_model_is_refused_before_loading(
    tmp_path: Path, source: WanModel, reference_output: torch.Tensor
) -> None:
    """The published folders are diffusers-style: config.json (the WanModel constructor's arguments) beside
    the shards. A config that matches loads; one of another family or size is refused, naming the fields."""
    import json

    from workers.checkpoint import _config_json_fields

    folder = tmp_path / "published"
    save_dit_checkpoint(source, folder, shards=2)
    stated = {"_class_name": "WanModel", **_config_json_fields(TINY)}
    (folder / "config.json").write_text(json.dumps(stated))
    model, _ = load_dit_checkpoint(folder, TINY)
    assert torch.equal(_run(model), reference_output)
    liveact = get_model_preset("soulx-liveact-tiny")
    (folder / "config.json").write_text(json.dumps({**stated, "intermediate_dim": 512, "num_layers": 40}))
    with pytest.raises(CheckpointError, match=r"num_layers: file 40, preset 2.*--preset soulx-liveact"):
        load_dit_checkpoint(folder, liveact)

"""``talkingmachines serve`` options: config file ``[serve]`` table, command line, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model_bundle import DEFAULT_BUNDLE_DIR, load_bundle
from server.run_options import parse_run_options
from server.serve import parse_serve_options


def _config(tmp_path: Path, serve: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(f'[serve]\n{serve}\n[api]\napi_key = "k"\n')
    return path


def test_serve_table_sets_defaults_and_the_command_line_wins(tmp_path: Path) -> None:
    config = _config(tmp_path, 'resolution = "48x48"\ndecoder = "colocated"\nahead = 0.6')
    options = parse_serve_options(["--config", str(config), "--ahead", "0.4", "--device", "cpu"])
    assert (options.height, options.width, options.decoder) == (48, 48, "colocated")
    assert options.ahead_s == 0.4


def test_tiny_serves_the_trained_default_at_its_training_size(tmp_path: Path) -> None:
    options = parse_serve_options(["--config", str(_config(tmp_path, "")), "--device", "cpu"])
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    assert (options.height, options.width) == (bundle.height, bundle.width)
    assert options.checkpoint == str(bundle.dit) and options.vae_checkpoint == str(bundle.vae)
    assert options.stream_config().train_latent_frames == bundle.train_latent_frames
    assert options.tiny_encoder_seed == bundle.encoder_seed  # not --seed: the encoders it was trained with
    seeded = parse_serve_options(["--config", str(_config(tmp_path, "")), "--device", "cpu", "--seed", "5"])
    assert seeded.tiny_encoder_seed == bundle.encoder_seed and seeded.seed == 5


def test_random_weights_default_to_a_size_that_runs_in_real_time_on_a_cpu(tmp_path: Path) -> None:
    argv = ["--config", str(_config(tmp_path, "")), "--device", "cpu", "--random-weights", "--seed", "3"]
    options = parse_serve_options(argv)
    assert (options.height, options.width) == (32, 32)
    assert options.checkpoint is None and options.vae_checkpoint is None
    assert options.stream_config().train_latent_frames == 21 and options.tiny_encoder_seed == 3


def test_unknown_serve_option_in_the_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['resolutoin'\]"):
        parse_serve_options(["--config", str(_config(tmp_path, 'resolutoin = "32x32"'))])


def test_a_server_without_an_api_key_refuses_to_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TALKINGMACHINES_API_KEY", raising=False)
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nresolution = "32x32"\n')
    with pytest.raises(ValueError, match="api_key is required"):
        parse_serve_options(["--config", str(path), "--device", "cpu"])


def test_a_serve_only_config_takes_the_api_key_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TALKINGMACHINES_API_KEY", "from-env")
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nresolution = "48x48"\n')
    options = parse_serve_options(["--config", str(path), "--device", "cpu"])
    assert options.api_settings().api_key.get_secret_value() == "from-env"


@pytest.mark.parametrize(
    ("device", "gpus", "workers", "placement"),
    [("cpu", 0, 1, "dedicated"), ("cuda", 1, 1, "colocated"), ("cuda", 2, 1, "dedicated"),
     ("cuda", 2, 2, "colocated"), ("cuda", 3, 2, "dedicated")],
)  # fmt: skip
def test_the_default_decoder_fits_the_visible_gpus(
    tmp_path: Path, monkeypatch, device: str, gpus: int, workers: int, placement: str
) -> None:
    # a one-GPU machine used to refuse `run`/`serve` without --decoder colocated ('disaggregated 1+1' needs 2)
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    argv = ["--config", str(_config(tmp_path, "")), "--device", device, "--score-workers", str(workers)]
    assert parse_serve_options(argv).decoder == placement
    explicit = parse_serve_options([*argv, "--decoder", "dedicated"])
    assert explicit.decoder == "dedicated"  # an explicit choice is kept (and checked when the run starts)
    run_argv = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", device,
                "--score-workers", str(workers)]  # fmt: skip
    assert parse_run_options(run_argv).decoder == placement


def test_the_decoder_options_reach_serve_and_its_sessions(tmp_path: Path) -> None:
    import torch

    from decoder.streaming import DecodeOptions

    base = ["--config", str(_config(tmp_path, "")), "--device", "cpu", "--random-weights"]
    assert parse_serve_options(base).decode_options() == DecodeOptions()
    argv = [*base, "--vae-autocast", "bfloat16", "--vae-channels-last", "--vae-compile"]
    options = parse_serve_options([*argv, "--vae-chunk-at-once"])
    assert (options.vae_autocast, options.vae_channels_last, options.vae_compile) == ("bfloat16", True, True)
    assert options.decode_options() == DecodeOptions(torch.bfloat16, True, True, True)
    config = _config(tmp_path, "vae_channels_last = true")
    table = parse_serve_options(["--config", str(config), "--device", "cpu"])
    assert table.vae_channels_last is True


def test_a_bad_decoder_option_in_the_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--vae-autocast must be one of none, bfloat16, got 'fp8'"):
        parse_serve_options(["--config", str(_config(tmp_path, 'vae_autocast = "fp8"')), "--device", "cpu"])

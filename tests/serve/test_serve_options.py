"""``talkingmachines serve`` options: config file ``[serve]`` table, command line, validation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from frontends.model_bundle import DEFAULT_BUNDLE_DIR, load_bundle
from server.options import resolve_dtype
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


RUN_ARGV = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4"]


@pytest.mark.parametrize(
    ("device", "flag", "dtype"),
    [("cpu", None, "float32"), ("cuda", None, "bfloat16"), ("cpu", "auto", "float32"),
     ("cuda", "auto", "bfloat16"), ("cuda", "float32", "float32"), ("cpu", "bfloat16", "bfloat16")],
)  # fmt: skip
def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_the_cpu(
    tmp_path: Path, device: str, flag: str | None, dtype: str
) -> None:
    # Parsing only: --device cuda parses on a machine without a GPU (validate_inputs / the ranks refuse it).
    extra = ["--device", device, *(["--dtype", flag] if flag else [])]
    run = parse_run_options([*RUN_ARGV, *extra])
    serve = parse_serve_options(["--config", str(_config(tmp_path, "")), *extra])
    assert run.dtype == serve.dtype == resolve_dtype(flag or "auto", device) == dtype
    assert run.torch_dtype == serve.torch_dtype == getattr(torch, dtype)
    # The VAE keeps float32 weights and autocasts its decode in bfloat16.
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    assert run.vae_autocast_dtype == serve.vae_autocast_dtype == autocast
    assert run.decode_options().autocast_dtype == serve.decode_options().autocast_dtype == autocast


def test_serve_table_sets_the_dtype_and_the_command_line_wins(tmp_path: Path) -> None:
    argv = ["--config", str(_config(tmp_path, 'dtype = "bfloat16"')), "--device", "cpu"]
    assert parse_serve_options(argv).dtype == "bfloat16"
    assert parse_serve_options([*argv, "--dtype", "float32"]).dtype == "float32"


def test_a_bad_dtype_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_run_options([*RUN_ARGV, "--device", "cpu", "--dtype", "float16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    choices = r"\(choose from '?auto'?, '?float32'?, '?bfloat16'?\)"  # Python 3.12+ quotes them
    assert re.search(r"argument --dtype: invalid choice: 'float16' " + choices, err), err
    # A config file's value does not go through argparse's choices: the same names, checked when resolved.
    with pytest.raises(ValueError, match=r"--dtype 'fp16' is not one of auto, float32, bfloat16"):
        parse_serve_options(["--config", str(_config(tmp_path, 'dtype = "fp16"')), "--device", "cpu"])
    with pytest.raises(ValueError, match="is not one of"):
        resolve_dtype("bf16", "cuda")


def test_compile_is_opt_in_for_run_and_serve(tmp_path: Path) -> None:
    argv = ["--config", str(_config(tmp_path, "")), "--device", "cpu"]
    assert not parse_serve_options(argv).compile_score
    assert parse_serve_options([*argv, "--compile"]).compile_score
    run = ["--image", "i.png", "--audio", "a.wav", "--out", "o.mp4", "--device", "cpu"]
    assert not parse_run_options(run).compile_score
    assert parse_run_options([*run, "--compile"]).compile_score


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
    with pytest.raises(ValueError, match=r"--vae-autocast must be one of auto, none, bfloat16, got 'fp8'"):
        parse_serve_options(["--config", str(_config(tmp_path, 'vae_autocast = "fp8"')), "--device", "cpu"])
    # --vae-autocast none keeps float32 decoding even under --dtype bfloat16.
    argv = ["--config", str(_config(tmp_path, "")), "--device", "cpu", "--dtype", "bfloat16"]
    assert parse_serve_options([*argv, "--vae-autocast", "none"]).decode_options().autocast_dtype is None


def test_fault_handling_options_default_to_5_s_and_3_restarts_in_10_minutes(tmp_path: Path) -> None:
    config = _config(tmp_path, "max_worker_restarts = 1")
    options = parse_serve_options(["--config", str(config), "--device", "cpu", "--heartbeat-timeout", "3"])
    assert (options.heartbeat_timeout_s, options.max_worker_restarts) == (3.0, 1)
    assert options.worker_restart_window_s == 600.0
    defaults = parse_serve_options(["--config", str(_config(tmp_path, "")), "--device", "cpu"])
    assert (defaults.heartbeat_timeout_s, defaults.max_worker_restarts) == (5.0, 3)
    for bad in (
        ["--heartbeat-timeout", "0.5"],
        ["--max-worker-restarts", "-1"],
        ["--worker-restart-window", "0"],
    ):
        with pytest.raises(ValueError, match=bad[0]):
            parse_serve_options(["--config", str(_config(tmp_path, "")), "--device", "cpu", *bad])


def test_the_default_audio_cap_grows_with_ahead_and_a_cap_too_small_is_refused(tmp_path: Path) -> None:
    config = str(_config(tmp_path, ""))
    plain = parse_serve_options(["--config", config, "--device", "cpu"])
    assert plain.max_pending_audio_s == 30.0
    far = parse_serve_options(["--config", config, "--device", "cpu", "--ahead", "40"])
    floor = 40 + 3 * far.stream_config().chunk_duration_s(1)
    assert far.max_pending_audio_s == math.ceil(floor) > 30  # a benchmark's large --ahead just works
    with pytest.raises(ValueError, match="--max-pending-audio-s 35 is below"):
        parse_serve_options(
            ["--config", config, "--device", "cpu", "--ahead", "40", "--max-pending-audio-s", "35"]
        )

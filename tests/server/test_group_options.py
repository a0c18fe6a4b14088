"""The group's options (``server.options``): ``run`` and ``serve`` accept the same group flags and parse
them into the same ``GroupOptions`` fields, built and checked by one function."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from frontends.model_bundle import DEFAULT_BUNDLE_DIR, load_bundle
from proto.stream_config import StreamConfig
from server.options import CHUNK_TIMEOUT_S, GroupOptions, add_group_arguments, group_options, parse_cores
from server.run_options import RunOptions, build_run_parser, parse_run_options
from server.serve import ServeOptions, build_serve_parser, parse_serve_options

RUN = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4"]


def _serve_argv(tmp_path: Path) -> list[str]:
    config = tmp_path / "serve.toml"
    config.write_text('[api]\napi_key = "k"\n')
    return ["--config", str(config)]


GROUP_ARGVS = [
    [],
    ["--random-weights", "--height", "48", "--width", "64", "--seed", "3", "--prompt", "hello"],
    ["--random-weights", "--resolution", "64x64", "--score-workers", "2", "--decoder", "colocated",
     "--steps", "4", "--chunk-frames", "7", "--dtype", "bfloat16", "--compile", "--threads", "2"],
    ["--score-workers", "2", "--decoder", "dedicated", "--vae-autocast", "none", "--vae-channels-last",
     "--vae-chunk-at-once", "--device-memory", "500", "--pin-cores", "1,0", "--rank-report", "reports"],
]  # fmt: skip


@pytest.mark.parametrize("group", GROUP_ARGVS)
def test_run_and_serve_parse_the_same_group_flags_into_the_same_group_options(
    tmp_path: Path, group: list[str]
) -> None:
    argv = ["--device", "cpu", "--chunk-timeout", "5", *group]
    run = parse_run_options([*RUN, *argv])
    serve = parse_serve_options([*_serve_argv(tmp_path), *argv])
    assert isinstance(run, RunOptions) and isinstance(serve, ServeOptions)
    assert run.group_fields() == serve.group_fields()
    args = build_run_parser(argparse.ArgumentParser()).parse_args([*RUN, *argv])
    assert group_options(args, GroupOptions).group_fields() == run.group_fields()  # one builder


def test_the_two_commands_define_the_group_flags_once() -> None:
    group = argparse.ArgumentParser()
    add_group_arguments(group, "run", prompt_help="")
    flags = {s for action in group._actions for s in action.option_strings} - {"-h", "--help"}
    for build in (build_run_parser, build_serve_parser):
        parser = build(argparse.ArgumentParser())
        assert flags <= {s for action in parser._actions for s in action.option_strings}
    assert {"--height", "--width", "--chunk-frames", "--pin-cores", "--rank-report"} <= flags


def test_only_the_chunk_timeout_default_differs(tmp_path: Path) -> None:
    run = parse_run_options([*RUN, "--device", "cpu"])
    serve = parse_serve_options([*_serve_argv(tmp_path), "--device", "cpu"])
    assert (run.chunk_timeout_s, serve.chunk_timeout_s) == (CHUNK_TIMEOUT_S["run"], CHUNK_TIMEOUT_S["serve"])
    differ = {k for k, v in run.group_fields().items() if serve.group_fields()[k] != v}
    assert differ == {"chunk_timeout_s"}


def test_the_group_flags_and_the_serve_table_reach_serve(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    table = 'chunk_frames = 5\npin_cores = [2, 3]\nrank_report = "r"'
    config.write_text(f'[serve]\n{table}\n[api]\napi_key = "k"\n')
    options = parse_serve_options(["--config", str(config), "--device", "cpu", "--height", "32"])
    assert (options.chunk_latent_frames, options.pin_cores, options.rank_report) == (5, (2, 3), Path("r"))
    assert (options.height, options.width) == (32, 64)  # --width: the trained tiny default's


def test_the_chunk_size_defaults_to_the_bundle_s_and_is_checked_against_its_window() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    argv = [*RUN, "--device", "cpu"]
    assert parse_run_options(argv).chunk_latent_frames == bundle.chunk_latent_frames
    assert parse_run_options([*argv, "--random-weights"]).stream_config().chunk_latent_frames == 3
    five = parse_run_options([*argv, "--chunk-frames", "5"]).stream_config()
    assert (five.chunk_latent_frames, five.train_latent_frames) == (5, bundle.train_latent_frames)
    with pytest.raises(ValueError, match=r"=15 must be a multiple of chunk_latent_frames=7"):
        parse_run_options([*argv, "--chunk-frames", "7"])


def test_pin_cores_are_core_numbers() -> None:
    assert parse_cores("0, 2") == (0, 2)
    assert parse_cores([1]) == (1,)
    assert parse_cores(None) is None
    for bad in ("", "a,b", "-1", "0,,1"):
        with pytest.raises(ValueError, match=r"--pin-cores .* must be comma-separated core numbers"):
            parse_cores(bad)


def test_resolution_and_height_width_are_one_or_the_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give either --resolution HxW or --height/--width"):
        parse_serve_options([*_serve_argv(tmp_path), "--resolution", "32x32", "--height", "32"])


def test_a_missing_checkpoint_is_named_by_both_commands(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    for parse, head in ((parse_run_options, RUN), (parse_serve_options, _serve_argv(tmp_path))):
        with pytest.raises(ValueError, match=r"--checkpoint '.*nope.safetensors' does not exist"):
            parse([*head, "--device", "cpu", "--checkpoint", missing])  # type: ignore[operator]


def test_the_stream_follows_the_preset_s_schedule_and_liveact_s_chunks_are_fixed(tmp_path: Path) -> None:
    argv = [*RUN, "--device", "cpu", "--preset", "soulx-liveact-tiny", "--random-weights"]
    options = parse_run_options(argv)
    stream = options.stream_config()
    assert stream == StreamConfig.for_schedule("soulx-liveact", height=32, width=32)  # the CPU-scale size
    assert (stream.fps, stream.frames_in_chunk(0), stream.frames_in_chunk(1)) == (24, 6, 8)
    assert options.vae_preset == "tiny"
    assert parse_run_options([*argv, "--steps", "4"]).stream_config().denoising_steps == (1000, 750, 500, 250)
    for parse, head in ((parse_run_options, RUN), (parse_serve_options, _serve_argv(tmp_path))):
        rest = argv[len(RUN) :]
        with pytest.raises(ValueError, match=r"'soulx-liveact' schedule, whose chunks are fixed: 6 latent"):
            parse([*head, *rest, "--chunk-frames", "4"])  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"audio_from_step=1 must index one of the 1 steps"):
        parse_run_options([*argv, "--steps", "1"])
    # the talkingmachines presets keep theirs: 16 fps, 3-frame chunks, 2 steps
    tiny = parse_run_options([*RUN, "--device", "cpu", "--random-weights"]).stream_config()
    assert tiny == StreamConfig.for_schedule("talkingmachines", height=32, width=32)


def test_only_the_cpu_scale_presets_run_without_a_checkpoint() -> None:
    with pytest.raises(ValueError, match=r"preset 'soulx-liveact' has no trained weights here"):
        parse_run_options([*RUN, "--device", "cpu", "--preset", "soulx-liveact", "--random-weights"])

"""The decoder options of ``run`` and ``serve`` (``--vae-*``): one definition, parsed into the options and
turned into the ``DecodeSession`` every product path builds; the memory plan counts a whole-chunk decode."""

from __future__ import annotations

import pytest
import torch

from decoder.streaming import DecodeOptions
from decoder.vae import build_vae
from engine.memory_plan import plan_for_options, vae_sizes
from proto.vae_config import get_vae_preset
from server.run_options import parse_run_options

RUN = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]


def test_defaults_are_the_plain_float32_per_latent_decode_on_the_cpu() -> None:
    options = parse_run_options(RUN)  # --vae-autocast auto follows --dtype: float32 on the CPU
    assert (options.vae_autocast, options.vae_channels_last, options.vae_compile) == ("auto", False, False)
    assert options.vae_chunk_at_once is False
    assert options.decode_options() == DecodeOptions()


def test_every_option_reaches_the_decode_session() -> None:
    argv = [*RUN, "--vae-autocast", "bfloat16", "--vae-channels-last", "--vae-compile", "--vae-chunk-at-once"]
    decode = parse_run_options(argv).decode_options()
    assert decode == DecodeOptions(
        autocast_dtype=torch.bfloat16, channels_last=True, compile_step=True, chunk_at_once=True
    )
    session = decode.session(build_vae(get_vae_preset("tiny")), 16, 16)
    assert (session.autocast_dtype, session.channels_last) == (torch.bfloat16, True)
    assert session.chunk_at_once and session._compiled_step is not None  # compiled on the second chunk


def test_chunk_at_once_and_per_latent_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_run_options([*RUN, "--vae-per-latent"]).vae_chunk_at_once is False
    with pytest.raises(SystemExit):
        parse_run_options([*RUN, "--vae-chunk-at-once", "--vae-per-latent"])
    error = capsys.readouterr().err
    assert "argument --vae-per-latent: not allowed with argument --vae-chunk-at-once" in error


def test_a_bad_autocast_value_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_run_options([*RUN, "--vae-autocast", "float16"])
    assert exc.value.code == 2
    assert "argument --vae-autocast: invalid choice: 'float16' (choose from auto, none, bfloat16)" in (
        capsys.readouterr().err.replace("'auto', 'none', 'bfloat16'", "auto, none, bfloat16")
    )


def test_prepare_puts_the_weights_channels_last_only_when_asked() -> None:
    vae = build_vae(get_vae_preset("tiny"))
    weight = vae.decoder.conv1.weight
    assert DecodeOptions().prepare(vae).decoder.conv1.weight is weight
    DecodeOptions(channels_last=True).prepare(vae)
    assert vae.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_the_memory_plan_counts_a_whole_chunk_decode() -> None:
    per_latent = plan_for_options(parse_run_options([*RUN, "--resolution", "64x64"]))
    at_once = plan_for_options(parse_run_options([*RUN, "--resolution", "64x64", "--vae-chunk-at-once"]))
    one, three = vae_sizes("tiny", 64, 64, 1)["decode_peak"], vae_sizes("tiny", 64, 64, 3)["decode_peak"]
    assert 2 * one < three < 4 * one  # three latents' activations instead of one's
    # The master counts the larger of its decode and encode peaks (it does not run them at once).
    assert per_latent.ranks[0].decode_activations < at_once.ranks[0].decode_activations == three
    assert per_latent.ranks[0].decode_cache_per_session == at_once.ranks[0].decode_cache_per_session

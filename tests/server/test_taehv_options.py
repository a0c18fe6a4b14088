"""``--vae-decoder taew2.1`` / ``--taehv-checkpoint``: parsed once for ``run`` and ``serve``, checked at
start-up, turned into the decode options whose sessions decode with ``decoder.taehv``; the memory plan
counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from decoder.streaming import DecodeOptions, DecodeSession
from decoder.taehv import TAEHVSession, build_taehv
from decoder.vae import build_vae
from engine.memory_plan import plan_for_options, taehv_sizes, vae_sizes
from proto.vae_config import get_vae_preset
from server.master import build_decode_options
from server.run_options import parse_run_options
from server.serve import parse_serve_options

RUN = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
TAE = ["--vae-decoder", "taew2.1"]


def test_the_wan_vae_stays_the_default_decoder() -> None:
    options = parse_run_options(RUN)
    assert (options.vae_decoder, options.taehv_checkpoint) == ("wan2.1", None)
    decode = build_decode_options(options, torch.device("cpu"))
    assert decode == DecodeOptions() and decode.fast_decoder is None
    assert isinstance(decode.session(build_vae(get_vae_preset("tiny")), 16, 16), DecodeSession)


def test_taew2_1_on_a_tiny_preset_decodes_with_seeded_random_weights() -> None:
    options = parse_run_options([*RUN, *TAE, "--seed", "5", "--vae-chunk-at-once"])
    decode = build_decode_options(options, torch.device("cpu"))
    session = decode.session(build_vae(get_vae_preset("tiny")), 16, 16)
    assert isinstance(session, TAEHVSession) and session.chunk_at_once
    same, other = build_taehv(seed=5).state_dict(), build_taehv(seed=6).state_dict()
    weights = decode.fast_decoder.state_dict()
    assert all(torch.equal(weights[k], same[k]) for k in same)
    assert not torch.equal(weights["decoder.1.weight"], other["decoder.1.weight"])


def test_a_checkpoint_path_reaches_the_decoder(tmp_path: Path) -> None:
    path = tmp_path / "taew2_1.pth"
    torch.save({k: torch.full_like(v, 0.01) for k, v in build_taehv(seed=0).state_dict().items()}, path)
    options = parse_run_options([*RUN, *TAE, "--taehv-checkpoint", str(path)])
    fast = build_decode_options(options, torch.device("cpu")).fast_decoder
    assert fast is not None and bool((fast.decoder[1].weight == 0.01).all())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "talkingmachines-18b", *TAE], "needs its weights: download taew2_1.pth"),
        (["--taehv-checkpoint", "x.pth"], "--taehv-checkpoint is the weights of --vae-decoder taew2.1"),
        ([*TAE, "--taehv-checkpoint", "/nonexistent/taew2_1.pth"], "does not exist"),
        ([*TAE, "--vae-compile"], "--vae-compile compiles the Wan VAE's decoder step"),
    ],
)
def test_bad_combinations_are_refused_at_start_up(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_run_options([*RUN, *argv])
    assert message in str(exc.value)


def test_a_wrong_checkpoint_is_refused_before_the_ranks_start(tmp_path: Path) -> None:
    path = tmp_path / "taew2_2.pth"
    torch.save({"decoder.1.weight": torch.zeros(256, 48, 3, 3)}, path)
    with pytest.raises(ValueError) as exc:
        parse_run_options([*RUN, *TAE, "--taehv-checkpoint", str(path)])
    assert "key decoder.1.weight has shape [256, 48, 3, 3], the taew2.1 decoder expects [256, 16, 3, 3]" in (
        str(exc.value)
    )


def test_the_memory_plan_counts_the_fast_decoder_state_and_weights() -> None:
    wan = plan_for_options(parse_run_options([*RUN, "--resolution", "64x64"])).ranks[0]
    tae = plan_for_options(parse_run_options([*RUN, *TAE, "--resolution", "64x64"])).ranks[0]
    sizes = taehv_sizes(64, 64)
    assert tae.vae_weights == wan.vae_weights + 4 * sizes["parameters"]  # the Wan VAE still encodes
    session = TAEHVSession(build_taehv(seed=0), 64, 64)
    session.decode_chunk(torch.zeros(16, 3, 8, 8))
    assert sizes["decode_cache_elements"] * 4 == session.cache_nbytes()
    y = wan.decode_cache_per_session - 4 * vae_sizes("tiny", 64, 64)["decode_cache_elements"]  # I2V share
    assert tae.decode_cache_per_session == session.cache_nbytes() + y
    assert tae.decode_activations >= sizes["decode_peak"] > 0


def _serve_config(tmp_path: Path, table: str) -> list[str]:
    config = tmp_path / "serve.toml"
    config.write_text(f'[serve]\n{table}\n[api]\napi_key = "k"\n')
    return ["--config", str(config), "--device", "cpu", "--random-weights"]


def test_serve_takes_the_same_flags_and_its_config_table(tmp_path: Path) -> None:
    path = tmp_path / "taew2_1.safetensors"
    save_file(build_taehv(seed=0).state_dict(), path)
    flags = [*TAE, "--taehv-checkpoint", str(path)]
    serve = parse_serve_options([*_serve_config(tmp_path, ""), *flags])
    run = parse_run_options([*RUN, *flags])
    assert (serve.vae_decoder, serve.taehv_checkpoint) == (run.vae_decoder, run.taehv_checkpoint)
    assert serve.group_fields() | {"chunk_timeout_s": 0} == run.group_fields() | {"chunk_timeout_s": 0}
    table = parse_serve_options(_serve_config(tmp_path, 'vae_decoder = "taew2.1"'))
    assert table.vae_decoder == "taew2.1"
    with pytest.raises(ValueError, match=r"--vae-decoder must be one of wan2\.1, taew2\.1, got 'taesd'"):
        parse_serve_options(_serve_config(tmp_path, 'vae_decoder = "taesd"'))

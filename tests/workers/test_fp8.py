"""FP8 (workers.fp8, workers.kv_cache.Fp8KV, workers.fp8_check): e4m3 quantisation bounds, the emulated
W8A8 layer against the matmul of its dequantised operands, which layers the conversion touches, the CPU
refusal of ``--fp8 linear`` through the real option parsing, the FP8 KV cache (agreement, bytes, memory
plan) and the quality check on the tiny preset. All on CPU: the real ``torch._scaled_mm`` path is GPU-only
(benchmarks/gpu_check.sh)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_world import run_world

from engine.memory_plan import dit_weight_bytes, kv_cache_bytes, plan_for_options
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from server import rank_main
from server.cli import main as cli_main
from server.rank_main import build_score_rank
from server.run_options import parse_run_options
from workers import fp8_check
from workers.factory import build_score_model
from workers.fp8 import (
    E4M3,
    E4M3_MAX,
    Fp8Linear,
    convert_to_fp8,
    dequantize,
    fp8_supported,
    quantize,
    quantize_with_scale,
    require_fp8,
)
from workers.kv_cache import ChunkKVCache, Fp8KV
from workers.streaming import StreamingDiT

# e4m3: 3 mantissa bits, so rounding a normal value moves it by at most half an ulp = 2^-4 of its magnitude;
# below the smallest normal (2^-6, in units of the scale) the spacing is 2^-9, so at most 2^-10 · scale.
REL = 2.0**-4
SUBNORMAL_ABS = 2.0**-10
F32_TOL = 1e-5  # float32 rounding of the reference matmuls


def _bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return REL * x.abs() + SUBNORMAL_ABS * scale + 1e-7 * x.abs()


def _rows(seed: int = 0) -> torch.Tensor:
    """[64, 256] rows of very different magnitudes (1e-3 .. 1e3), as activations of different tokens."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-3, 3, 64)[:, None]
    return torch.randn(64, 256, generator=gen) * mags


# ---- quantise / dequantise --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_round_trip_error_is_within_the_e4m3_bound(granularity: str) -> None:
    x = _rows()
    q, scale = quantize(x, granularity)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if granularity == "row" else (1, 1))
    back = dequantize(q, scale)
    err = (back - x).abs()
    assert bool((err <= _bound(x, scale)).all()), float((err - _bound(x, scale)).max())
    assert float(err.max()) > 0  # it is a lossy format: a test that passed with no rounding would be wrong
    # the amax of each row (of the tensor) maps to ±448 and comes back to itself
    amax = x.abs().amax(dim=-1) if granularity == "row" else x.abs().amax()
    assert float(q.float().abs().max()) == E4M3_MAX
    if granularity == "row":
        assert torch.allclose(back.abs().amax(dim=-1), amax, rtol=1e-6)


def test_per_row_scales_keep_small_rows_that_a_per_tensor_scale_flushes() -> None:
    x = _rows()
    small = slice(0, 8)  # rows of magnitude ~1e-3, six decades below the largest
    row = dequantize(*quantize(x, "row"))
    tensor = dequantize(*quantize(x, "tensor"))
    row_err = (row[small] - x[small]).norm() / x[small].norm()
    tensor_err = (tensor[small] - x[small]).norm() / x[small].norm()
    assert row_err < 0.05  # e4m3's ~3 % relative L2
    assert tensor_err > 0.5  # below e4m3's smallest subnormal in the tensor's scale: mostly zeros


def test_values_beyond_the_scale_saturate_at_the_e4m3_maximum_instead_of_overflowing() -> None:
    x = torch.tensor([0.5, -3.0, 1e6, -1e30, 447.0])
    q = quantize_with_scale(x, torch.tensor(1.0))
    assert q.float().tolist() == [0.5, -3.0, E4M3_MAX, -E4M3_MAX, 448.0]  # 447 rounds to 448 (spacing 32)
    assert not torch.isnan(q.float()).any()
    q, scale = quantize(torch.tensor([[1e30, -2.0, 0.0]]))
    assert math.isfinite(float(scale)) and float(q.float()[0, 0]) == E4M3_MAX
    zeros, zero_scale = quantize(torch.zeros(2, 8))
    assert bool((zeros.float() == 0).all()) and bool((zero_scale > 0).all())  # no division by zero


# ---- the layer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_emulated_fp8_linear_is_the_matmul_of_its_dequantised_operands(granularity: str) -> None:
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(2, 5, 64, generator=gen) * 3
    layer = Fp8Linear.from_linear(linear, granularity, "emulate")
    got = layer(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    # the reference: quantise both operands here, dequantise, multiply in float64
    xq, xs = quantize(x.reshape(-1, 64), granularity)
    wq, ws = quantize(linear.weight, granularity)
    want = F.linear(dequantize(xq, xs).double(), dequantize(wq, ws).double(), linear.bias.double())
    assert torch.allclose(got.reshape(-1, 48).double(), want, rtol=F32_TOL, atol=F32_TOL)
    # and it differs from the full-precision layer by e4m3's rounding of two operands: small, not zero
    exact = linear(x)
    rel = float((got - exact.detach()).norm() / exact.detach().norm())
    assert 1e-3 < rel < 0.06, rel


def test_fp8_linear_keeps_a_bfloat16_bias_and_returns_the_input_dtype() -> None:
    linear = nn.Linear(32, 16).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, "row", "emulate")
    assert layer.weight_fp8.dtype == E4M3 and layer.weight_fp8.shape == (16, 32)
    assert layer.weight_scale.shape == (16, 1) and layer.weight_scale.dtype == torch.float32
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
    out = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 16)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_the_scaled_mm_call_computes_what_the_emulation_does_on_torchs_cpu_kernel(granularity: str) -> None:
    """The serving path's ``torch._scaled_mm`` call (operand layouts, scale shapes, bias, output dtype) run on
    torch's CPU reference kernel where this torch has one: it must give the emulation's output within one
    bfloat16 rounding (observed: identical). The CUDA kernel behind the same call is unmeasured here."""
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 7, 64, generator=gen).to(torch.bfloat16)
    emulated = Fp8Linear.from_linear(linear, granularity, "emulate")(x)
    try:
        real = Fp8Linear.from_linear(linear, granularity, "scaled_mm")(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU torch._scaled_mm for e4m3 ({exc})")
    assert real.dtype == torch.bfloat16 and real.shape == (2, 7, 48)
    torch.testing.assert_close(real, emulated, rtol=2.0**-7, atol=1e-6)


# ---- which layers the conversion touches -------------------------------------------------------------------

# The DiT's large linear layers, per block, by name (the FFN's two linears are ffn.0 and ffn.2).
TALKINGMACHINES_FP8 = [
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "cross_attn.k_img", "cross_attn.v_img", "cross_attn.k_audio", "cross_attn.v_audio",
    "ffn.0", "ffn.2",
]  # fmt: skip
LIVEACT_FP8 = [
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img",
    "audio_cross_attn.q_linear", "audio_cross_attn.kv_linear", "audio_cross_attn.proj",
    "ffn.0", "ffn.2",
]  # fmt: skip
KEPT_LINEARS = {
    "tiny": ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
             "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3", "audio_proj.proj.0",
             "audio_proj.proj.2", "audio_proj.proj.4"],
    "soulx-liveact-tiny": ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                           "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3",
                           "audio_proj.proj1", "audio_proj.proj1_vf", "audio_proj.proj2", "audio_proj.proj3"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "per_block"), [("tiny", TALKINGMACHINES_FP8), ("soulx-liveact-tiny", LIVEACT_FP8)]
)
def test_convert_to_fp8_touches_exactly_the_large_linears_and_keeps_the_rest(
    preset: str, per_block: list
) -> None:
    model = build_score_model(preset, seed=0)
    before = {name: (p.dtype, p.clone()) for name, p in model.named_parameters()}
    report = convert_to_fp8(model, mode="emulate")
    layers = get_model_preset(preset).num_layers
    expected = {f"blocks.{i}.{name}" for i in range(layers) for name in per_block}
    assert set(report.converted) == expected
    assert {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)} == expected
    assert set(report.kept) == set(KEPT_LINEARS[preset])
    for name in KEPT_LINEARS[preset]:
        assert type(model.get_submodule(name)) is nn.Linear
    # every parameter outside the converted layers is untouched: the same dtype and values
    converted_weights = {f"{n}.weight" for n in expected}
    after = dict(model.named_parameters())
    assert set(before) - set(after) == converted_weights
    for name, param in after.items():
        dtype, value = before[name]
        assert param.dtype == dtype and torch.equal(param, value), name
    kept_prefixes = ("patch_embedding", "blocks.0.modulation", "blocks.0.norm3", "head.modulation")
    assert all(any(n.startswith(p) for n in after) for p in kept_prefixes)


def test_a_named_layer_whose_features_the_gemm_cannot_align_is_kept_and_said_why() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].ffn = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 32))
    report = convert_to_fp8(model, mode="emulate")
    assert report.converted == []
    assert set(report.kept) == {"blocks.0.ffn.0", "blocks.0.ffn.2"}
    assert "multiples of 16" in report.kept["blocks.0.ffn.0"]


# ---- the device check and the refusal ----------------------------------------------------------------------


def test_fp8_matrix_products_are_refused_on_cpu_with_the_reason() -> None:
    ok, reason = fp8_supported("cpu")
    assert not ok and "compute capability >= 8.9" in reason and "cpu" in reason
    with pytest.raises(ValueError, match=r"--fp8 linear is not available here: .* the device is cpu"):
        require_fp8("cpu")


def test_run_refuses_fp8_linear_on_cpu_at_option_parsing_and_accepts_the_fp8_cache(tmp_path: Path) -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
    with pytest.raises(ValueError, match=r"--fp8 linear is not available here: .*cpu.*run without --fp8"):
        parse_run_options([*run, "--fp8", "linear"])
    options = parse_run_options([*run, "--kv-cache-dtype", "fp8"])
    assert (options.fp8, options.kv_cache_dtype) == ("off", "fp8")
    assert options.fp8_summary == "fp8 off, KV cache fp8 (e4m3 + per-token-head scales)"
    defaults = parse_run_options(run)
    assert (defaults.fp8, defaults.kv_cache_dtype) == ("off", "auto")  # nothing FP8 by default


def test_the_cli_exits_2_naming_the_flag_before_anything_starts(capsys: pytest.CaptureFixture) -> None:
    argv = [
        "run",
        "--image",
        "a.png",
        "--audio",
        "a.wav",
        "--out",
        "a.mp4",
        "--device",
        "cpu",
        "--fp8",
        "linear",
    ]
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert "--fp8 linear is not available here" in capsys.readouterr().err


# ---- the FP8 KV cache -------------------------------------------------------------------------------------


def test_fp8_kv_views_quantise_on_write_and_dequantise_on_read() -> None:
    gen = torch.Generator().manual_seed(3)
    cache = Fp8KV.zeros((2, 1, 12, 4, 32), "cpu")  # [layers, B, N, H, D]
    x = torch.randn(1, 5, 4, 32, generator=gen) * torch.logspace(-2, 2, 4)[:, None]  # heads of other ranges
    cache[1][:, 3:8].copy_(x)
    back = cache[1][:, 3:8].dequantize(torch.float32)
    scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    assert bool(((back - x).abs() <= _bound(x, scale)).all()) and float((back - x).abs().max()) > 0
    assert float(cache[0].dequantize(torch.float32).abs().max()) == 0  # other views untouched
    cache[0][:, 0:5].copy_(cache[1][:, 3:8])  # an FP8 view copied into another: exact
    assert torch.equal(cache[0][:, 0:5].dequantize(torch.float32), back)


def _stream(
    model: nn.Module, stream: StreamConfig, kv: str, chunks: int
) -> tuple[list[torch.Tensor], object]:
    engine = StreamingDiT(model, stream, kv_cache_dtype=kv)
    cfg = model.config
    gen = torch.Generator().manual_seed(11)
    clip = torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=gen) if cfg.has_image_branch else None
    state = engine.open_session(torch.randn(cfg.text_len, cfg.text_dim, generator=gen), clip)
    latents = []
    for i in range(chunks):
        noise = torch.randn((len(engine.timesteps), *stream.latent_shape(i)), generator=gen)
        f, h, w = stream.frames_in_chunk(i), stream.latent_height, stream.latent_width
        y = torch.randn(cfg.in_dim - cfg.out_dim, f, h, w, generator=gen) if cfg.has_image_branch else None
        latents.append(engine.denoise_chunk(state, i, y=y, noise=noise))
    return latents, state


# The FP8 cache moves the seeded random tiny models' latents by ~3e-4 relative L2 (measured: 3.1e-4 .. 5.3e-4
# over the chunks at 64x64; the trained tiny default, with sharper attention, moves by 3.7 .. 5.5 %: README);
# the bound leaves room, and the lower bound shows the cache is really stored in e4m3.
KV_FP8_REL_L2 = 3e-3


@pytest.mark.parametrize(
    ("preset", "chunks"),
    [("tiny", 4), ("soulx-liveact-tiny", 3)],  # LiveAct: chunk 2 updates the ConvKV memory
)
def test_an_fp8_cache_streams_the_latents_of_the_float32_cache_within_fp8_rounding(
    preset: str, chunks: int
) -> None:
    torch.set_num_threads(1)
    model = build_score_model(preset, seed=4)
    stream = StreamConfig.for_schedule(model.config.stream_schedule, height=32, width=32)
    if preset == "tiny":  # a 9-frame window stops moving at chunk 3: the ring's keys are shifted in place
        stream = StreamConfig.for_schedule(
            model.config.stream_schedule, height=32, width=32, train_latent_frames=9
        )
        assert any(StreamingDiT(model, stream).previous_shift(i) for i in range(chunks))
    want, _ = _stream(model, stream, "auto", chunks)
    got, state = _stream(model, stream, "fp8", chunks)
    assert isinstance(state.cache.k, Fp8KV) and state.cache.k.dtype == E4M3
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        rel = float((g - w).norm() / w.norm())
        assert 1e-6 < rel < KV_FP8_REL_L2, (i, rel)


def test_the_fp8_cache_holds_half_the_bytes_of_bfloat16_plus_its_scales() -> None:
    shape = dict(num_layers=2, num_slots=2, batch=1, tokens=48, heads=4, head_dim=128, device="cpu")
    bf16 = ChunkKVCache(dtype=torch.bfloat16, **shape)
    fp8 = ChunkKVCache(dtype=torch.bfloat16, kv_dtype="fp8", **shape)
    assert isinstance(fp8.k, Fp8KV) and isinstance(fp8.v, Fp8KV)
    data = sum(t.data.numel() * t.data.element_size() for t in (fp8.k, fp8.v))
    scales = sum(t.scale.numel() * t.scale.element_size() for t in (fp8.k, fp8.v))
    assert data * 2 == bf16.nbytes  # e4m3 is exactly half of bf16
    elements = bf16.nbytes // 2
    assert scales == elements // 128 * 4  # one float32 scale per (token, head) of 128 values
    assert fp8.nbytes == data + scales
    assert fp8.nbytes / bf16.nbytes == pytest.approx((128 + 4) / (2 * 128))  # 0.516


def test_the_memory_plan_counts_the_fp8_cache_and_weights_a_session_and_model_really_hold() -> None:
    config = get_model_preset("tiny")
    stream = StreamConfig.for_schedule(config.stream_schedule, height=32, width=32)
    model = build_score_model("tiny", seed=0)
    _, state = _stream(model, stream, "fp8", 1)
    planned = kv_cache_bytes(config, stream, 1, torch.float32, "fp8")
    assert planned["self_attn"] == state.cache.nbytes
    assert planned["self_attn"] < kv_cache_bytes(config, stream, 1, torch.float32)["self_attn"]
    for dtype in (torch.float32, torch.bfloat16):
        converted = build_score_model("tiny", seed=0, dtype=dtype)
        convert_to_fp8(converted, mode="emulate")
        held = sum(t.numel() * t.element_size() for t in (*converted.parameters(), *converted.buffers()))
        assert dit_weight_bytes(config, dtype, fp8_linear=True) == held
        assert held < dit_weight_bytes(config, dtype)


def test_plan_for_options_takes_the_fp8_flags() -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
    plain = plan_for_options(parse_run_options(run)).ranks[-1]
    fp8 = plan_for_options(parse_run_options([*run, "--kv-cache-dtype", "fp8"])).ranks[-1]
    assert fp8.kv_cache_per_session < plain.kv_cache_per_session
    assert (
        fp8.dit_weights == plain.dit_weights
    )  # --fp8 linear is refused on CPU, so it cannot be planned here


# ---- the quality check ------------------------------------------------------------------------------------


def test_fp8_check_reports_a_small_nonzero_latent_difference_and_says_it_emulated(
    tmp_path: Path, capsys
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "fp8.json"
    code = fp8_check.main(
        ["--preset", "tiny", "--resolution", "32x32", "--chunks", "2", "--per-layer", "--json", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "emulated (quantise-dequantise, float32 matmul)" in text and "the device is cpu" in text
    report = json.loads(out.read_text())
    assert report["fp8_mode"] == "emulate" and report["dtype"] == "float32"
    assert report["converted_layers"] == 2 * len(TALKINGMACHINES_FP8)
    # random weights: ~3 % relative L2 on the latents (measured 3.0e-2 .. 3.2e-2 at 64x64); nonzero, small
    assert all(1e-3 < c["rel_l2"] < 0.1 for c in report["per_chunk"]), report["per_chunk"]
    assert 0 < report["max_abs"] < report["per_chunk"][0]["ref_max_abs"]
    assert set(report["per_layer_rel_l2"]) == {
        f"blocks.{i}.{n}" for i in range(2) for n in TALKINGMACHINES_FP8
    }
    assert all(1e-3 < e < 0.1 for e in report["per_layer_rel_l2"].values())
    assert report["weight_bytes"]["fp8"] < report["weight_bytes"]["reference"]
    assert re.search(r"chunk 1: latent max \|d\| \S+, relative L2 \S+", text)


def test_fp8_check_insists_on_the_real_kernel_only_where_it_exists(capsys) -> None:
    code = fp8_check.main(
        ["--preset", "tiny", "--resolution", "32x32", "--chunks", "1", "--mode", "scaled_mm"]
    )
    assert code == 2
    assert "--mode scaled_mm needs FP8 matrix products" in capsys.readouterr().err


# ---- where the score side applies the options ------------------------------------------------------------


def _single_rank() -> SimpleNamespace:
    """What ``build_score_rank`` and ``ScoreRank`` read of a one-process group's ``ProcessGroups``."""
    topology = SimpleNamespace(step_pipeline=False)
    return SimpleNamespace(device=torch.device("cpu"), sp=None, rank=0, is_sp_leader=True, topology=topology)


def test_the_score_rank_is_built_with_the_fp8_cache_the_options_ask_for() -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
    rank = build_score_rank(parse_run_options([*run, "--kv-cache-dtype", "fp8"]), _single_rank())
    assert rank.engine.kv_cache_dtype == "fp8"
    assert not any(isinstance(m, Fp8Linear) for m in rank.engine.model.modules())  # --fp8 stays off
    plain = build_score_rank(parse_run_options(run), _single_rank())
    assert plain.engine.kv_cache_dtype == "auto"


def test_a_rank_refuses_fp8_linear_on_its_device_before_loading_weights(monkeypatch) -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
    options = dataclasses.replace(parse_run_options(run), fp8="linear")  # as if the launcher had a GPU

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the FP8 check")

    monkeypatch.setattr(rank_main, "build_score_model", no_weights)
    with pytest.raises(ValueError, match="--fp8 linear is not available here"):
        build_score_rank(options, _single_rank())


def test_fp8_linear_on_a_gpu_group_needs_bfloat16(monkeypatch) -> None:
    run = ["--image", "a.png", "--audio", "a.wav", "--out", "a.mp4", "--device", "cpu", "--random-weights"]
    options = parse_run_options(run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the launcher's view of a GPU machine
    gpu = dataclasses.replace(options, device="cuda", fp8="linear")
    with pytest.raises(ValueError, match="--fp8 linear needs --dtype bfloat16"):
        gpu.check()
    dataclasses.replace(gpu, dtype="bfloat16").check()  # the capability itself is each rank's check


# ---- the FP8 cache under sequence parallelism ------------------------------------------------------------

# Each SP rank quantises its own heads of every token, one scale per (token, head) as one rank does, so the
# cache is the single rank's head slice; only keys whose float32 values differ by SP's rounding (~1e-6) on
# either side of an e4m3 rounding boundary can come out one e4m3 step apart. Observed here: every e4m3 value
# equal, scales within 6e-7 relative, latents within 1.7e-6; the bounds leave room for such flips elsewhere.
SP_FP8_ATOL = 1e-4


def _sp_fp8_equals_single(rank: int, world: int) -> None:
    stream = StreamConfig(height=32, width=32)
    model = build_score_model("tiny", seed=3)
    single, single_state = _stream(model, stream, "fp8", 3)
    engine = StreamingDiT(model, stream, sp_group=dist.group.WORLD, kv_cache_dtype="fp8")
    cfg = model.config
    gen = torch.Generator().manual_seed(11)  # _stream's inputs, drawn in the same order
    clip = torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=gen)
    state = engine.open_session(torch.randn(cfg.text_len, cfg.text_dim, generator=gen), clip)
    heads = cfg.num_heads // world
    mine = slice(rank * heads, (rank + 1) * heads)
    for i in range(3):
        noise = torch.randn((len(engine.timesteps), *stream.latent_shape(i)), generator=gen)
        f, h, w = stream.frames_in_chunk(i), stream.latent_height, stream.latent_width
        y = torch.randn(cfg.in_dim - cfg.out_dim, f, h, w, generator=gen)
        got = engine.denoise_chunk(state, i, y=y, noise=noise)
        assert float((got - single[i]).abs().max()) <= SP_FP8_ATOL, (rank, i)
    k, want = state.cache.k, single_state.cache.k
    assert isinstance(k, Fp8KV) and k.shape[-2] == heads
    same = (k.data.float() == want.data[..., mine, :].float()).float().mean()
    assert float(same) > 0.999, float(same)  # the same e4m3 values but for SP's rare boundary flips
    assert torch.allclose(k.scale, want.scale[..., mine, :], rtol=1e-5)


def test_two_sp_workers_with_the_fp8_cache_give_the_latents_of_one(tmp_path: Path) -> None:
    run_world(_sp_fp8_equals_single, 2, tmp_path)

"""`talkingmachines inspect`: exact parameter counts, and memory/FLOPs that match wan.md §5.4 and §7."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning
from workers.inspect import describe_preset, flops_per_forward, format_preset_report, main
from workers.model import WanModel


def test_t2v_1_3b_parameters_equal_wan_exact_counts() -> None:
    p = describe_preset("wan2.1-t2v-1.3b")["parameters"]
    assert p["total"] == 1_418_996_800
    assert p["audio"] == 0
    assert p["parts"] == {
        "patch_embedding": 99_840,
        "text_embedding": 8_653_824,
        "time_embedding": 2_755_584,
        "time_projection": 14_164_992,
        "blocks": 30 * 46_440_704,
        "head": 101_440,
    }


def test_i2v_14b_parameters_equal_wan_exact_counts() -> None:
    p = describe_preset("wan2.1-i2v-14b")["parameters"]
    assert p["total"] == 16_394_878_784
    assert p["parts"] == {
        "patch_embedding": 742_400,
        "text_embedding": 47_196_160,
        "time_embedding": 27_535_360,
        "time_projection": 157_317_120,
        "blocks": 40 * 403_838_464,
        "head": 337_984,
        "img_emb": 8_211_200,
    }


def test_18b_is_i2v_14b_plus_a_1_2b_audio_projection_and_its_total_is_printed() -> None:
    d = describe_preset("talkingmachines-18b")
    p = d["parameters"]
    assert p["wan"] == 16_394_878_784
    assert p["total"] == p["wan"] + p["audio"]
    assert 1.15e9 < p["parts"]["audio_proj"] < 1.25e9
    assert 17.5e9 < p["total"] < 18.5e9
    assert f"{p['total']:,}" in format_preset_report(d)


def test_i2v_14b_flops_per_forward_match_wan_md() -> None:
    fl = describe_preset("wan2.1-i2v-14b")["flops"]
    assert fl["l_q"] == 3072 and fl["l_kv"] == 9216 and fl["l_ctx"] == 769
    per = fl["per_forward"]
    assert per["linear"] / 1e12 == pytest.approx(73.44, abs=0.01)
    assert per["self_attn"] / 1e12 == pytest.approx(23.19, abs=0.01)
    assert per["cross_attn"] / 1e12 == pytest.approx(1.94, abs=0.01)
    assert per["total_without_audio"] / 1e12 == pytest.approx(98.6, abs=0.05)
    assert fl["forwards_per_chunk"] == 2
    assert fl["per_chunk"] == 2 * per["total"]


def test_t2v_1_3b_flops_per_forward_match_wan_md() -> None:
    per = describe_preset("wan2.1-t2v-1.3b")["flops"]["per_forward"]
    assert per["total"] / 1e12 == pytest.approx(13.2, abs=0.05)


def test_18b_flops_add_the_audio_path_to_the_i2v_14b_forward() -> None:
    audio = describe_preset("talkingmachines-18b")["flops"]["per_forward"]
    plain = describe_preset("wan2.1-i2v-14b")["flops"]["per_forward"]
    assert audio["total_without_audio"] == plain["total"]
    assert 0 < audio["audio"] < 0.01 * plain["total"]


def test_clean_context_mode_costs_one_more_forward_and_half_the_self_attn_cache() -> None:
    per_step = describe_preset("wan2.1-i2v-14b")
    clean = describe_preset("wan2.1-i2v-14b", stream_cfg=StreamConfig(cache_mode="clean-context"))
    assert clean["flops"]["forwards_per_chunk"] == 3
    assert 2 * clean["kv_cache"]["self_attn_bytes"] == per_step["kv_cache"]["self_attn_bytes"]


def test_memory_at_512_matches_wan_md() -> None:
    big = describe_preset("wan2.1-i2v-14b")
    small = describe_preset("wan2.1-t2v-1.3b")
    assert big["weights_bf16_bytes"] / 1e9 == pytest.approx(32.8, abs=0.05)
    assert small["weights_bf16_bytes"] / 1e9 == pytest.approx(2.84, abs=0.005)
    # wan.md §5.4: c_0 + c_{t-1} (6144 tokens) = 5.03 GB (14B) / 1.13 GB (1.3B); per-step keeps 2 sets.
    assert big["kv_cache"]["self_attn_bytes"] / 1e9 == pytest.approx(2 * 5.03, abs=0.01)
    assert small["kv_cache"]["self_attn_bytes"] / 1e9 == pytest.approx(2 * 1.13, abs=0.01)
    assert big["kv_cache"]["cross_attn_bytes"] / 1e9 == pytest.approx(0.63, abs=0.005)
    assert small["kv_cache"]["cross_attn_bytes"] / 1e9 == pytest.approx(0.094, abs=0.001)


def test_analytic_flops_equal_a_flop_counter_on_a_steady_state_tiny_forward() -> None:
    """The formula covers every matmul of the real forward: chunk 2 with c_0 + c_{t-1} cached, with audio."""
    cfg = get_model_preset("tiny")
    stream = StreamConfig(height=64, width=64)
    audio_cfg = cfg.audio
    assert audio_cfg is not None
    frames, chunk = stream.chunk_latent_frames, stream.tokens_per_chunk
    h, w = stream.latent_height, stream.latent_width
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    with torch.no_grad():
        cross_kv = model.cross_attention_kv(
            torch.randn(1, cfg.text_len, cfg.text_dim), torch.randn(1, cfg.clip_tokens, cfg.clip_dim)
        )
        prefix = [
            (torch.randn(1, 2 * chunk, cfg.num_heads, cfg.head_dim),) * 2 for _ in range(cfg.num_layers)
        ]
        audio = AudioConditioning(
            features=torch.randn(
                1, 1, frames + audio_cfg.window - 1, audio_cfg.frames_per_latent, audio_cfg.wav2vec_layers,
                audio_cfg.wav2vec_dim,
            ),
            speaking=torch.ones(1, 1, frames, dtype=torch.bool),
        )
        with FlopCounterMode(display=False) as counter:
            model(
                torch.randn(1, cfg.out_dim, frames, h, w),
                torch.tensor([500.0]),
                cross_kv=cross_kv,
                y=torch.randn(1, cfg.in_dim - cfg.out_dim, frames, h, w),
                audio=audio,
                frame_positions=torch.arange(2 * frames, 3 * frames),
                prefix_kv=prefix,
                prefix_frame_positions=torch.arange(2 * frames),
            )
    assert counter.get_total_flops() == flops_per_forward(cfg, stream, l_kv=3 * chunk)["total"]


def test_report_has_parameter_memory_and_flops_sections() -> None:
    report = format_preset_report(describe_preset("wan2.1-i2v-14b"))
    for section in ("Parameters", "Memory", "FLOPs per chunk"):
        assert f"\n{section}\n" in report
    assert "16,394,878,784" in report
    assert "L_kv 9216" in report


def test_main_prints_the_report_for_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "wan2.1-t2v-1.3b"]) == 0
    assert "1,418,996,800" in capsys.readouterr().out


def test_liveact_is_inspected_on_its_own_schedule_with_the_memory_plan_s_caches() -> None:
    import torch

    from engine.memory_plan import kv_cache_bytes
    from proto.model_config import get_model_preset

    d = describe_preset("soulx-liveact")
    stream = StreamConfig.for_schedule("soulx-liveact")
    assert d["stream"]["first_chunk_latent_frames"] == 6 and d["stream"]["chunk_latent_frames"] == 8
    planned = kv_cache_bytes(get_model_preset("soulx-liveact"), stream, 1, torch.bfloat16)
    assert d["kv_cache"]["self_attn_bytes"] == planned["self_attn"] == 3 * 11_744_051_200  # 11.7 GB a step
    assert d["kv_cache"]["cross_attn_bytes"] == planned["cross_attn"]
    assert d["flops"]["l_kv"] == 14 * 1024 and d["flops"]["forwards_per_chunk"] == 3
    assert d["schedule_note"] is None
    assert "3 caches (one per denoising step) × 14 frames" in format_preset_report(d)

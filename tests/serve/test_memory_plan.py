"""The start-up memory plan (``engine.memory_plan``): its figures against what is really allocated, and the
refusal of ``serve`` options that cannot fit (``run``'s CLI refusal is in tests/runtime)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from decoder.streaming import DecodeSession
from engine.memory_plan import (
    GIB,
    LiveTensorBytes,
    alternatives,
    dit_activation_bytes,
    kv_cache_bytes,
    plan_memory,
    vae_sizes,
)
from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from proto.topology import Topology
from server.serve import parse_serve_options
from workers.audio import AudioConditioning
from workers.factory import build_score_model
from workers.model import WanModel
from workers.streaming import StreamingDiT

H100_18B_WEIGHTS_GIB = 33.4  # benchmarks/README.md "GPU results": the 18B in bf16 on one H100


def _tiny_plan(stream: StreamConfig, sessions: int = 1, decoder: str = "dedicated") -> object:
    topology = Topology(score_workers=1, decoder=decoder, device="cpu", num_heads=4)
    return plan_memory(get_model_preset("tiny"), stream, topology, sessions=sessions)


@pytest.mark.parametrize("cache_mode", ["per-step", "clean-context"])
def test_tiny_weights_and_kv_cache_equal_the_bytes_a_session_allocates(cache_mode: str) -> None:
    config = get_model_preset("tiny")
    stream = StreamConfig(height=64, width=64, cache_mode=cache_mode)
    worker = _tiny_plan(stream).ranks[1]
    model = build_score_model("tiny")
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert worker.dit_weights == weights
    engine = StreamingDiT(model, stream)
    clip = torch.zeros(config.clip_tokens, config.clip_dim)
    state = engine.open_session(torch.zeros(config.text_len, config.text_dim), clip)
    assert worker.kv_cache_per_session == state.nbytes  # self-attention cache + cross-attention K/V, exactly
    # each of N SP ranks keeps H/N heads of the self-attention cache and all heads of the cross-attention
    halves = kv_cache_bytes(config, stream, 2, torch.float32)
    assert halves["self_attn"] * 2 == state.cache.nbytes
    assert halves["cross_attn"] == state.nbytes - state.cache.nbytes


def test_tiny_decode_cache_equals_a_decode_sessions_cache() -> None:
    from decoder.vae import build_vae
    from proto.vae_config import get_vae_preset

    stream = StreamConfig(height=64, width=64)
    master = _tiny_plan(stream).ranks[0]
    vae = build_vae(get_vae_preset("tiny"))
    session = DecodeSession(vae, 64, 64)
    with torch.no_grad():
        session.decode_chunk(torch.zeros(1, 16, 3, 8, 8))
    y = 20 * stream.train_latent_frames * 8 * 8 * 4  # the I2V conditioning the master keeps per session
    assert master.decode_cache_per_session == session.cache.nbytes() + y
    assert master.vae_weights == sum(p.numel() * 4 for p in vae.parameters())


def _engine(preset: str, stream: StreamConfig, dtype: torch.dtype, device: str) -> StreamingDiT:
    """The preset's streaming engine, uninitialised weights built in ``dtype`` on ``device`` (meta: free)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanModel(get_model_preset(preset)).eval()
    finally:
        torch.set_default_dtype(default)
    return StreamingDiT(model, stream)


def _traced_forward_peak(preset: str, size: int, dtype: torch.dtype, device: str) -> int:
    """Live bytes created by one steady-state (chunk 2) streaming forward, weights and caches excluded."""
    config = get_model_preset(preset)
    stream = StreamConfig(height=size, width=size)
    engine = _engine(preset, stream, dtype, device)
    clip = torch.zeros(config.clip_tokens, config.clip_dim, device=device)
    state = engine.open_session(torch.zeros(config.text_len, config.text_dim, device=device), clip)
    f, h, w = stream.chunk_latent_frames, stream.latent_height, stream.latent_width
    audio = config.audio
    assert audio is not None
    features = torch.zeros(
        1, 1, f + audio.window - 1, audio.frames_per_latent, audio.wav2vec_layers, audio.wav2vec_dim
    )
    conditioning = AudioConditioning(
        features=features.to(device), speaking=torch.ones(1, 1, f, dtype=torch.bool, device=device)
    )
    x = torch.zeros(16, f, h, w, device=device)
    y = torch.zeros(20, f, h, w, device=device)
    with torch.no_grad(), LiveTensorBytes() as trace:
        engine.step(state, x, 0, 2, y, engine.chunk_inputs(2, conditioning, torch.device(device)))
    return trace.peak


def test_activation_estimate_is_close_to_a_traced_forward(monkeypatch) -> None:
    # tiny: a real forward on the CPU (SDPA's fused kernel, no mask)
    stream = StreamConfig(height=64, width=64)
    estimate = dit_activation_bytes(get_model_preset("tiny"), stream, 1, torch.float32)
    traced = _traced_forward_peak("tiny", 64, torch.float32, "cpu")
    assert 0.9 * traced <= estimate <= 1.25 * traced, (estimate, traced)  # 1.06x here
    # the 18B at 512x512 in bf16 on the meta device; attention as a fused kernel (no score matrix) would run
    monkeypatch.setattr("workers.model.attention", lambda q, k, v, mask=None: torch.empty_like(q))
    config = get_model_preset("talkingmachines-18b")
    estimate = dit_activation_bytes(config, StreamConfig(), 1, torch.bfloat16)
    traced = _traced_forward_peak("talkingmachines-18b", 512, torch.bfloat16, "meta")
    assert 0.9 * traced <= estimate <= 1.25 * traced, (estimate / GIB, traced / GIB)  # 0.54 vs 0.51 GiB


def test_18b_weights_match_the_h100_measurement_and_sp_splits_the_cache_not_the_weights() -> None:
    config = get_model_preset("talkingmachines-18b")
    one = plan_memory(config, StreamConfig(), Topology(1, "dedicated", "cuda", config.num_heads))
    two = plan_memory(config, StreamConfig(), Topology(2, "dedicated", "cuda", config.num_heads))
    worker1, worker2 = one.ranks[1], two.ranks[1]
    assert worker1.dit_weights / GIB == pytest.approx(H100_18B_WEIGHTS_GIB, rel=0.02)
    assert worker2.dit_weights == worker1.dit_weights
    cross = kv_cache_bytes(config, StreamConfig(), 1, torch.bfloat16)["cross_attn"]
    assert worker2.kv_cache_per_session - cross == (worker1.kv_cache_per_session - cross) // 2
    # per-step cache of the 7-frame chunks: 10.9 GiB a step for c_0 and c_{t−1} (benchmarks/README.md), and
    # half as much again for the position c_t writes in place (one view of c_0, c_{t−1}, c_t per block)
    seven = StreamConfig(chunk_latent_frames=7, train_latent_frames=21)
    per_step = kv_cache_bytes(config, seven, 1, torch.bfloat16)["self_attn"] / seven.num_steps
    assert per_step / GIB == pytest.approx(10.9 * 3 / 2, abs=0.1)
    # ... which did not fit an 80 GB H100 at 2 steps; the plan says so, and fits the 3-frame chunks
    h100 = 79 * GIB
    assert not plan_memory(config, seven, Topology(1, "colocated", "cuda", 40)).fits(h100)
    assert plan_memory(config, StreamConfig(), Topology(1, "colocated", "cuda", 40)).fits(h100)


def test_every_suggested_alternative_fits_when_planned_again() -> None:
    config = get_model_preset("talkingmachines-18b")
    stream, topology, budget = StreamConfig(), Topology(1, "colocated", "cuda", 40), 80 * GIB
    plan = plan_memory(config, stream, topology, sessions=4)
    assert not plan.fits(budget)
    found = {a.option.split()[0]: a for a in alternatives(plan, config, stream, topology, budget)}
    assert set(found) == {"--score-workers", "max_sessions", "--resolution"}
    workers = int(found["--score-workers"].option.split()[1])
    again = plan_memory(config, stream, dataclasses.replace(topology, score_workers=workers), sessions=4)
    assert again.fits(budget) and again.need() == found["--score-workers"].plan.need()
    sessions = int(found["max_sessions"].option.split()[-1])
    assert plan_memory(config, stream, topology, sessions=sessions).fits(budget)
    assert not plan_memory(config, stream, topology, sessions=sessions + 1).fits(budget)  # the most that fit
    h, w = map(int, found["--resolution"].option.split()[1].split("x"))
    assert plan_memory(config, StreamConfig(height=h, width=w), topology, sessions=4).fits(budget)


def _serve_config(tmp_path: Path, max_sessions: int) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(f'[serve]\nresolution = "64x64"\n[api]\napi_key = "k"\nmax_sessions = {max_sessions}\n')
    return path


def test_serve_refuses_a_budget_it_cannot_fit_naming_the_numbers(tmp_path: Path) -> None:
    argv = ["--config", str(_serve_config(tmp_path, 4)), "--device", "cpu", "--random-weights"]
    with pytest.raises(ValueError) as refused:
        parse_serve_options([*argv, "--device-memory", "0.001"])
    message = str(refused.value)
    assert "disaggregated 1+1 with tiny (float32) at 64x64 for 4 session(s) does not fit" in message
    assert "where 0.0010 GiB is available (--device-memory)" in message
    for part in ("DiT weights", "KV cache", "x 4 =", "decode cache", "DiT activations", "margin"):
        assert part in message
    assert "no more score workers, fewer sessions or lower resolution fits" in message  # nothing fits 1 MiB
    assert parse_serve_options([*argv, "--device-memory", "1000"]).device_memory_gib == 1000


def test_serve_suggests_fewer_sessions_and_that_configuration_is_accepted(tmp_path: Path) -> None:
    stream = StreamConfig(height=64, width=64)
    need = {n: _tiny_plan(stream, sessions=n).need() for n in (1, 2, 8)}
    budget = f"{(need[1] + need[2]) / 2 / GIB:.6f}"  # room for one session, not for two
    argv = ["--device", "cpu", "--random-weights", "--device-memory", budget]
    with pytest.raises(ValueError, match=r"max_sessions = 1: needs"):
        parse_serve_options(["--config", str(_serve_config(tmp_path, 8)), *argv])
    options = parse_serve_options(["--config", str(_serve_config(tmp_path, 1)), *argv])
    assert options.device_memory_gib == float(budget)


def test_vae_sizes_of_wan21_match_inspect() -> None:
    from decoder.inspect import describe_vae

    sizes, described = vae_sizes("wan2.1", 512, 512), describe_vae("wan2.1")
    assert sizes["parameters"] == described["parameters"]["total"]
    assert sizes["decode_cache_elements"] == described["decode_cache"]["elements"]


def test_encoder_weights_of_wan_files_count_those_files_not_the_whole_published_folder(tmp_path) -> None:
    from engine.memory_plan import EncoderSources, _tiny_encoder_bytes, encoder_bytes
    from frontends.wan_encoders import WAN_CLIP_FILE, WAN_UMT5_FILE

    config = get_model_preset("tiny")
    assert config.has_image_branch
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / WAN_UMT5_FILE).write_bytes(b"u" * 3000)
    (folder / WAN_CLIP_FILE).write_bytes(b"c" * 2000)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"d" * 50_000)  # the DiT: not an encoder
    by_file = encoder_bytes(
        config,
        EncoderSources(
            umt5_checkpoint=str(folder / WAN_UMT5_FILE), clip_checkpoint=str(folder / WAN_CLIP_FILE)
        ),
    )
    by_folder = encoder_bytes(
        config, EncoderSources(umt5_checkpoint=str(folder), clip_checkpoint=str(folder))
    )
    assert by_file == by_folder == _tiny_encoder_bytes(config)["wav2vec2"] + 3000 + 2000


def test_liveact_caches_hold_its_14_frame_window_per_step_as_upstream_allocates() -> None:
    config = get_model_preset("soulx-liveact")
    stream = StreamConfig.for_schedule("soulx-liveact", height=512, width=512)
    cache = kv_cache_bytes(config, stream, 1, torch.bfloat16)
    # upstream generate.py: per step and block, K and V [1, 14·1024, 40, 128] bf16: 11.7 GB a step
    per_step = 40 * 2 * 14 * 1024 * 40 * 128 * 2
    assert per_step / 1e9 == pytest.approx(11.74, abs=0.01)
    assert cache["self_attn"] == 3 * per_step
    with_cfg = kv_cache_bytes(config, dataclasses.replace(stream, audio_cfg=2.0), 1, torch.bfloat16)
    assert with_cfg["self_attn"] == 5 * per_step  # + the null-audio caches of steps 1 and 2
    assert kv_cache_bytes(config, stream, 2, torch.bfloat16)["self_attn"] * 2 == cache["self_attn"]
    # activations of the 8-frame chunk over its 14-frame window: more than a 3-frame chunk's, a few GiB
    activations = dit_activation_bytes(config, stream, 1, torch.bfloat16)
    paper = dit_activation_bytes(get_model_preset("talkingmachines-18b"), StreamConfig(), 1, torch.bfloat16)
    assert paper < activations < 4 * GIB


def test_liveact_at_512_needs_a_gpu_for_the_score_worker_alone_on_80_gib(tmp_path: Path) -> None:
    weights = tmp_path / "liveact"
    weights.mkdir()
    argv = [
        "--config", str(_serve_config(tmp_path, 1)), "--preset", "soulx-liveact", "--checkpoint",
        str(weights), "--resolution", "512x512", "--device", "cuda", "--device-memory", "80",
    ]  # fmt: skip
    # self-contained on one GPU: weights 35.2 GiB + caches 3 × 10.9 GiB + the master's VAE: too much
    with pytest.raises(ValueError) as refused:
        parse_serve_options([*argv, "--decoder", "colocated"])
    message = str(refused.value)
    assert "self-contained 1 with soulx-liveact (bfloat16) at 512x512 for 1 session(s)" in message
    assert "DiT weights 35.17 GiB" in message and "KV cache 33.40 GiB" in message
    assert "--score-workers 2 (2 GPUs): needs" in message
    # the score worker on a GPU of its own fits (and two SP ranks do)
    assert parse_serve_options([*argv, "--decoder", "dedicated"]).decoder == "dedicated"
    assert parse_serve_options([*argv, "--decoder", "colocated", "--score-workers", "2"]).score_workers == 2


def test_liveact_kv_cache_equals_the_bytes_a_session_allocates_and_activations_a_traced_forward(
    monkeypatch,
) -> None:
    from workers.audio import InfiniteTalkAudio

    def run(preset: str, size: int, dtype: torch.dtype, device: str, cfg: float) -> tuple[int, int, object]:
        config = get_model_preset(preset)
        stream = StreamConfig.for_schedule("soulx-liveact", height=size, width=size, audio_cfg=cfg)
        engine = _engine(preset, stream, dtype, device)
        clip = torch.zeros(config.clip_tokens, config.clip_dim, device=device)
        state = engine.open_session(torch.zeros(config.text_len, config.text_dim, device=device), clip)
        a = config.audio
        for c in range(3):  # chunk 2 is steady: it updates the memory and attends to the whole window
            shape = (1, stream.video_frames_in_chunk(c), a.audio_window, a.wav2vec_layers, a.wav2vec_dim)
            audio = InfiniteTalkAudio(windows=torch.zeros(shape, device=device), starts_clip=c == 0)
            y = torch.zeros(20, *stream.latent_shape(c)[1:], device=device)
            noise = torch.zeros(stream.num_steps, *stream.latent_shape(c), device=device)
            with torch.no_grad(), LiveTensorBytes() as trace:
                engine.denoise_chunk(state, c, y=y, audio=audio, noise=noise)
        estimate = dit_activation_bytes(config, stream, 1, dtype)
        planned = sum(kv_cache_bytes(config, stream, 1, dtype).values())
        return trace.peak, estimate, (state.nbytes, planned)

    for cfg in (1.0, 2.0):  # audio CFG adds the null-audio caches of steps 1 and 2
        traced, estimate, (allocated, planned) = run("soulx-liveact-tiny", 64, torch.float32, "cpu", cfg)
        assert planned == allocated
    assert 0.9 * traced <= estimate <= 1.25 * traced, (estimate, traced)  # 0.93x here
    monkeypatch.setattr("workers.model.attention", lambda q, k, v, mask=None: torch.empty_like(q))
    traced, estimate, _ = run("soulx-liveact", 512, torch.bfloat16, "meta", 1.0)
    assert 0.9 * traced <= estimate <= 1.25 * traced, (estimate / GIB, traced / GIB)  # 1.64 vs 1.41 GiB

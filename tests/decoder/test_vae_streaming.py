"""Streaming decode: chunk by chunk equals Wan's whole-video decode, 9 then 12 frames, constant memory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch

from decoder.feature_cache import FeatureCache
from decoder.streaming import DecodeSession, convert_to_channels_last, frames_to_uint8
from decoder.vae import WanVAE, build_vae
from proto.vae_config import get_vae_preset

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The CI box has 2 cores shared by several jobs; one thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    """Tiny VAE with random, non-trivial weights (norm gains, attention output away from their init)."""
    torch.manual_seed(0)
    model = build_vae(get_vae_preset("tiny"))
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model


def _stream(session: DecodeSession, z: torch.Tensor, chunk: int = 3) -> list[torch.Tensor]:
    return [session.decode_latents(z[0, :, s : s + chunk]) for s in range(0, z.shape[2], chunk)]


def test_seven_chunks_equal_whole_video_decode(vae: WanVAE) -> None:
    torch.manual_seed(1)
    z = torch.randn(1, 16, 21, 2, 3)
    whole = vae.decode(z)
    chunks = _stream(DecodeSession(vae, 16, 24), z)
    streamed = torch.cat(chunks, dim=2)
    assert [c.shape[2] for c in chunks] == [9, 12, 12, 12, 12, 12, 12]
    assert streamed.shape == whole.shape == (1, 3, 81, 16, 24)
    assert (streamed - whole).abs().max().item() <= 1e-5
    # 1e-5 moves a pixel by far less than a level: only values on a rounding boundary may flip, by one.
    levels = (frames_to_uint8(streamed).int() - frames_to_uint8(whole).int()).abs()
    assert levels.max().item() <= 1 and levels.float().mean().item() <= 1e-3


def test_cached_per_latent_decode_equals_one_causal_pass(vae: WanVAE) -> None:
    # One decoder call over all latents has no cache traffic at all; equality shows the cache carries exactly
    # the causal context (and that latent 0 skips the temporal up-sampling's time convolution).
    torch.manual_seed(2)
    z = torch.randn(1, 16, 7, 2, 2)
    per_latent, one_pass = vae.decode(z), vae.decode(z, latents_per_step=7)
    assert per_latent.shape == one_pass.shape == (1, 3, 25, 16, 16)
    assert (per_latent - one_pass).abs().max().item() <= 1e-4


def test_whole_chunk_per_call_equals_per_latent_calls_over_seven_chunks(vae: WanVAE) -> None:
    # Seven chunks: the cache a whole-chunk call leaves behind must be what the per-latent calls leave.
    torch.manual_seed(6)
    z = torch.randn(1, 16, 21, 2, 3)
    per_latent = torch.cat(_stream(DecodeSession(vae, 16, 24), z), dim=2)
    session = DecodeSession(vae, 16, 24, chunk_at_once=True)
    chunks = _stream(session, z)
    assert [c.shape[2] for c in chunks] == [9, 12, 12, 12, 12, 12, 12]
    assert session.frames_decoded == 81
    at_once = torch.cat(chunks, dim=2)
    # Observed here: <= 4e-6 (benchmarks/vae_decode.py, several sizes and both presets).
    assert (at_once - per_latent).abs().max().item() <= 1e-4
    levels = (frames_to_uint8(at_once).int() - frames_to_uint8(per_latent).int()).abs()
    assert levels.max().item() <= 1 and levels.float().mean().item() <= 1e-3


def test_whole_chunk_per_call_keeps_the_cache_constant(vae: WanVAE) -> None:
    per_latent, at_once = DecodeSession(vae, 8, 8), DecodeSession(vae, 8, 8, chunk_at_once=True)
    footprint = []
    for _ in range(5):
        z = torch.randn(16, 3, 1, 1)
        per_latent.decode_chunk(z)
        at_once.decode_chunk(z)
        footprint.append((at_once.cache_nbytes(), [b.data_ptr() for b in at_once.cache.buffers]))
    assert footprint[0] == footprint[4]
    assert at_once.cache_nbytes() == per_latent.cache_nbytes()
    assert [b.shape for b in at_once.cache.buffers] == [b.shape for b in per_latent.cache.buffers]


@pytest.mark.parametrize(("height", "width"), [(16, 16), (16, 32), (24, 8)])
def test_chunks_give_9_then_12_uint8_frames(vae: WanVAE, height: int, width: int) -> None:
    session = DecodeSession(vae, height, width)
    shapes = [session.decode_chunk(torch.randn(16, 3, height // 8, width // 8)).shape for _ in range(3)]
    assert shapes == [(9, height, width, 3), (12, height, width, 3), (12, height, width, 3)]
    assert session.frames_decoded == 33


def test_decode_chunk_returns_uint8_frames_of_the_float_decode(vae: WanVAE) -> None:
    z = torch.randn(16, 3, 2, 2)
    frames = DecodeSession(vae, 16, 16).decode_chunk(z)
    video = DecodeSession(vae, 16, 16).decode_latents(z)
    assert frames.dtype == torch.uint8
    expected = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert torch.equal(frames, expected)


@pytest.mark.parametrize(("height", "width"), [(36, 48), (32, 50), (0, 16), (7, 8)])
def test_sizes_not_multiple_of_8_are_rejected(vae: WanVAE, height: int, width: int) -> None:
    with pytest.raises(ValueError, match=f"decode size {height}x{width} .* positive multiples of 8"):
        DecodeSession(vae, height, width)


def test_latent_chunk_of_another_resolution_is_rejected(vae: WanVAE) -> None:
    session = DecodeSession(vae, 32, 32)
    with pytest.raises(ValueError, match=r"expects \[16, T>=1, 4, 4\]"):
        session.decode_chunk(torch.randn(16, 3, 4, 6))


def test_cache_memory_is_constant_over_the_stream(vae: WanVAE) -> None:
    session = DecodeSession(vae, 8, 8)
    footprint = []
    for _ in range(7):
        session.decode_chunk(torch.randn(16, 3, 1, 1))
        footprint.append((session.cache_nbytes(), [b.data_ptr() for b in session.cache.buffers]))
    assert footprint[1] == footprint[6]
    assert len(session.cache.buffers) == 32


def test_sessions_do_not_share_state(vae: WanVAE) -> None:
    torch.manual_seed(3)
    za, zb = torch.randn(1, 16, 6, 1, 1), torch.randn(1, 16, 6, 1, 1)
    a, b = DecodeSession(vae, 8, 8), DecodeSession(vae, 8, 8)
    interleaved_a = []
    for s in (0, 3):
        interleaved_a.append(a.decode_latents(za[0, :, s : s + 3]))
        b.decode_latents(zb[0, :, s : s + 3])
    assert torch.equal(torch.cat(interleaved_a, dim=2), vae.decode(za))


def test_channels_last_layout_gives_the_same_frames(vae: WanVAE) -> None:
    torch.manual_seed(4)
    z = torch.randn(1, 16, 6, 1, 2)
    reference = torch.cat(_stream(DecodeSession(vae, 8, 16), z), dim=2)
    fresh = build_vae(get_vae_preset("tiny"))
    fresh.load_state_dict(vae.state_dict())
    convert_to_channels_last(fresh)
    streamed = torch.cat(_stream(DecodeSession(fresh, 8, 16, channels_last=True), z), dim=2)
    assert (streamed - reference).abs().max().item() <= 1e-5


def test_steady_state_decode_step_traces_as_one_graph(vae: WanVAE) -> None:
    cache = FeatureCache()
    vae.decode_step(torch.randn(1, 16, 1, 1, 1), cache)
    explained = torch._dynamo.explain(vae.decode_step)(torch.randn(1, 16, 1, 1, 1), cache)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_bf16_autocast_halves_the_cache_and_stays_close_to_float32(vae: WanVAE) -> None:
    torch.manual_seed(5)
    z = torch.randn(1, 16, 6, 2, 2)
    exact, half = DecodeSession(vae, 16, 16), DecodeSession(vae, 16, 16, autocast_dtype=torch.bfloat16)
    reference = torch.cat(_stream(exact, z), dim=2)
    approx = torch.cat(_stream(half, z), dim=2)
    assert half.cache_nbytes() * 2 == exact.cache_nbytes()
    levels = (frames_to_uint8(approx).int() - frames_to_uint8(reference).int()).abs().float()
    assert levels.mean().item() < 3.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_decode_on_a_side_stream_matches_float32_cpu(vae: WanVAE) -> None:
    z = torch.randn(16, 3, 4, 4)
    expected = DecodeSession(vae, 32, 32).decode_latents(z)
    gpu = build_vae(get_vae_preset("tiny"), "cuda")
    gpu.load_state_dict(vae.state_dict())
    stream = torch.cuda.Stream()
    session = DecodeSession(gpu, 32, 32, autocast_dtype=torch.bfloat16, channels_last=True)
    frames = session.decode_chunk(z.cuda(), stream=stream, synchronize=True)
    assert frames.shape == (9, 32, 32, 3)
    diff = (frames.cpu().int() - frames_to_uint8(expected).int()).abs()
    assert diff.float().mean().item() < 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_step_matches_eager(vae: WanVAE) -> None:
    gpu = build_vae(get_vae_preset("tiny"), "cuda")
    gpu.load_state_dict(vae.state_dict())
    z = torch.randn(1, 16, 6, 4, 4, device="cuda")
    eager = torch.cat(_stream(DecodeSession(gpu, 32, 32), z), dim=2)
    compiled = torch.cat(_stream(DecodeSession(gpu, 32, 32, compile_step=True), z), dim=2)
    # Inductor fuses and reorders the float32 arithmetic: an H100 (torch 2.11) differed by up to 0.004 on
    # [-1, 1] frames. One 8-bit level (2/255) is what the published frames can show.
    assert (compiled - eager).abs().max().item() <= 2 / 255


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile's CPU backend (inductor) builds C++ kernels and no C++ compiler is on PATH",
)
def test_compiled_whole_chunk_step_matches_eager_on_cpu(vae: WanVAE) -> None:
    # Cold, about 50 s on the 2-core CI box (inductor compiling the 3-latent step); seconds with its cache.
    torch.manual_seed(7)
    z = torch.randn(1, 16, 9, 1, 1)
    eager = torch.cat(_stream(DecodeSession(vae, 8, 8, chunk_at_once=True), z), dim=2)
    compiled = torch.cat(_stream(DecodeSession(vae, 8, 8, chunk_at_once=True, compile_step=True), z), dim=2)
    # Inductor reorders the float32 arithmetic (observed here: 3e-6).
    assert (compiled - eager).abs().max().item() <= 1e-4


@pytest.mark.parametrize("chunk_at_once", [False, True])
def test_liveact_chunks_of_6_then_8_latents_give_21_then_32_frames_of_the_whole_video_decode(
    vae: WanVAE, chunk_at_once: bool
) -> None:
    # The soulx-liveact schedule: chunk 0 has 6 latent frames, every later one 8 (proto.stream_config).
    torch.manual_seed(7)
    z = torch.randn(1, 16, 6 + 8 + 8, 2, 2)
    session = DecodeSession(vae, 16, 16, chunk_at_once=chunk_at_once)
    chunks = [session.decode_latents(z[0, :, a:b]) for a, b in ((0, 6), (6, 14), (14, 22))]
    assert [c.shape[2] for c in chunks] == [21, 32, 32]
    streamed, whole = torch.cat(chunks, dim=2), vae.decode(z)
    assert streamed.shape == whole.shape == (1, 3, 85, 16, 16)
    assert (streamed - whole).abs().max().item() <= (1e-4 if chunk_at_once else 1e-5)

"""The taew2.1 fast decoder (``decoder.taehv``) against madebyollin/taehv's own decoder, and its streaming.

The fixture (tests/oracles/make_taehv_fixtures.py) holds upstream's outputs for seeded weights that are not
stored: ``fill_tensor`` below redraws them from each key's name, they are written to a checkpoint under
upstream's key names and shapes (meta.json) and loaded through ``load_taehv``, so a wrong key name, shape
or layer order fails here. Tolerance: float32, 1e-5 (upstream's own sequential and parallel decodes of the
fixture differ by 1.6e-6).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from decoder.streaming import DecodeOptions, DecodeSession, frames_to_uint8
from decoder.taehv import (
    TAEHVCheckpointError,
    TAEHVDecoder,
    TAEHVSession,
    build_taehv,
    load_taehv,
)
from decoder.vae import build_vae
from proto.vae_config import get_vae_preset

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "taehv"
META = json.loads((FIXTURE / "meta.json").read_text())
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def fill_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """make_taehv_fixtures.py's procedure: randn seeded by SEED + crc32(key), He-like scale, bias offset."""
    fill = META["fill"]
    generator = torch.Generator().manual_seed(fill["seed"] + zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if key.endswith(".bias"):
        offset = float(fill.get(key, "+0").lstrip("+"))
        return values * fill["bias_scale"] + offset
    return values * (fill["weight_gain"] / math.sqrt(math.prod(shape[1:])))


def upstream_state() -> dict[str, torch.Tensor]:
    """The fixture's decoder weights under upstream's key names and shapes."""
    return {key: fill_tensor(key, tuple(shape)) for key, shape in META["decoder_keys"].items()}


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "taew2_1_decode.safetensors")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> TAEHVDecoder:
    # A full checkpoint: the encoder's keys ride along and are ignored.
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save({"encoder.0.weight": torch.zeros(64, 3, 3, 3), **upstream_state()}, path)
    return load_taehv(path)


def _latents(fixture: dict[str, torch.Tensor]) -> torch.Tensor:
    return fixture["latents"].transpose(0, 1).contiguous()  # upstream's [T, 16, h, w] -> ours [16, T, h, w]


def _pixels01(video: torch.Tensor) -> torch.Tensor:
    """Ours [1, 3, T, H, W] in [-1, 1] -> upstream's [T, 3, H, W] clamped to [0, 1]."""
    return ((video[0] + 1.0) / 2.0).clamp(0.0, 1.0).transpose(0, 1)


def _session(model: TAEHVDecoder, fixture: dict[str, torch.Tensor], **kwargs: bool) -> TAEHVSession:
    h, w = fixture["latents"].shape[2:]
    return TAEHVSession(model, 8 * h, 8 * w, **kwargs)


def test_the_fixture_is_meaningful(fixture) -> None:
    whole = fixture["whole"]
    assert whole.shape[0] == 13 == META["whole_frames"]  # 4 latents: 4 * 4 - 3 frames
    assert ((whole > 0) & (whole < 1)).float().mean() > 0.8  # compared values, not the clamp's 0s and 1s
    assert whole.std() > 0.1


def test_the_whole_sequence_matches_upstream(model, fixture) -> None:
    session = _session(model, fixture, chunk_at_once=True)
    video = session.decode_latents(_latents(fixture))
    torch.testing.assert_close(_pixels01(video), fixture["whole"], **TOLERANCE)


def test_streamed_chunk_by_chunk_matches_upstream_streaming_and_our_whole_decode(model, fixture) -> None:
    latents = _latents(fixture)
    for chunk_at_once in (False, True):
        session = _session(model, fixture, chunk_at_once=chunk_at_once)
        pieces, start = [], 0
        for size, frames in zip(META["chunks"], META["frames_per_chunk"], strict=True):
            assert session.frames_for(size) == frames
            pieces.append(session.decode_latents(latents[:, start : start + size]))
            assert pieces[-1].shape[2] == frames
            start += size
        streamed = _pixels01(torch.cat(pieces, dim=2))
        torch.testing.assert_close(streamed, fixture["streamed"], **TOLERANCE)
        torch.testing.assert_close(streamed, fixture["whole"], **TOLERANCE)
        assert session.frames_decoded == 13 and session.latents_decoded == 4


def test_chunks_give_the_frames_of_the_wan_vae_path_as_uint8() -> None:
    latents = torch.randn(16, 9, 2, 2, generator=torch.Generator().manual_seed(3))
    wan = DecodeSession(build_vae(get_vae_preset("tiny")), 16, 16)
    tae = DecodeOptions(fast_decoder=build_taehv(seed=0)).session(build_vae(get_vae_preset("tiny")), 16, 16)
    assert isinstance(tae, TAEHVSession)
    for start in range(0, 9, 3):
        chunk = latents[:, start : start + 3]
        want, got = wan.decode_chunk(chunk), tae.decode_chunk(chunk)
        assert got.dtype == want.dtype == torch.uint8
        assert got.shape == want.shape  # [9, 16, 16, 3], then [12, 16, 16, 3]
    assert tae.frames_decoded == wan.frames_decoded == 1 + 4 * 8


def test_the_stream_state_is_allocated_once_and_stays_the_same_size(model) -> None:
    session = TAEHVSession(model, 8, 16, chunk_at_once=True)
    latents = torch.randn(16, 2, 1, 2)
    session.decode_chunk(latents)
    pointers = [b.data_ptr() for b in session.state.buffers]
    size = session.cache_nbytes()
    # 9 MemBlocks: 3 at 256 x 1 x 2, 3 at 128 x 2 x 4, 3 at 64 x 4 x 8 (float32)
    assert size == 4 * 3 * (256 * 2 + 128 * 8 + 64 * 32)
    for _ in range(15):
        assert session.decode_chunk(latents).shape == (8, 8, 16, 3)
        assert session.cache_nbytes() == size
        assert [b.data_ptr() for b in session.state.buffers] == pointers  # written in place


def test_safetensors_loads_the_same_weights(model, tmp_path: Path) -> None:
    path = tmp_path / "taew2_1.safetensors"
    save_file(upstream_state(), path)
    loaded = load_taehv(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_time_doubling_kernel_at_the_first_tgrow_keeps_its_last_time_step(tmp_path: Path) -> None:
    state = upstream_state()
    first = state["decoder.7.conv.weight"]
    state["decoder.7.conv.weight"] = torch.cat([torch.zeros_like(first), first])
    path = tmp_path / "doubled.pth"
    torch.save(state, path)
    assert torch.equal(load_taehv(path).state_dict()["decoder.7.conv.weight"], first)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("decoder.9.conv.2.weight"), "lacks 1 of the 64 taew2.1 decoder tensors, e.g. "
         "decoder.9.conv.2.weight (expected shape [128, 128, 3, 3])"),
        (lambda s: s.update({"decoder.1.weight": torch.zeros(256, 48, 3, 3)}),
         "key decoder.1.weight has shape [256, 48, 3, 3], the taew2.1 decoder expects [256, 16, 3, 3]"),
        (lambda s: s.update({"model.decoder.1.weight": torch.zeros(1)}), "neither decoder.* nor encoder.*"),
        (lambda s: s.update({"decoder.23.weight": torch.zeros(3)}), "decoder keys taew2.1 does not have"),
        (lambda s: s.update({"decoder.1.bias": torch.zeros(256, dtype=torch.int64)}), "dtype torch.int64"),
    ],
)  # fmt: skip
def test_a_wrong_checkpoint_is_refused_naming_the_key_and_shapes(change, message, tmp_path: Path) -> None:
    state = upstream_state()
    change(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(TAEHVCheckpointError, match=r"taew2\.1 checkpoint .*bad\.pth") as exc:
        load_taehv(path)
    assert message in str(exc.value)


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TAEHVCheckpointError, match=r"does not exist; download taew2_1\.pth"):
        load_taehv(tmp_path / "missing.pth")
    pointer = tmp_path / "taew2_1.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(TAEHVCheckpointError, match=r"could not be read by torch\.load"):
        load_taehv(pointer)
    (tmp_path / "taew2_1.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(TAEHVCheckpointError, match="not a readable safetensors file"):
        load_taehv(tmp_path / "taew2_1.safetensors")
    (tmp_path / "taew2_1.onnx").write_bytes(b"")
    with pytest.raises(TAEHVCheckpointError, match=r"unknown suffix '\.onnx'"):
        load_taehv(tmp_path / "taew2_1.onnx")


def test_bad_latents_and_sizes_are_refused(model) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        TAEHVSession(model, 20, 16)
    session = TAEHVSession(model, 16, 16)
    with pytest.raises(ValueError, match=r"expects \[16, T>=1, 2, 2\]"):
        session.decode_chunk(torch.zeros(16, 3, 4, 4))


def test_channels_last_and_bf16_autocast_change_rounding_only(model, fixture) -> None:
    latents = _latents(fixture)
    want = TAEHVSession(model, 40, 40).decode_latents(latents)
    layout = TAEHVSession(model, 40, 40, channels_last=True).decode_latents(latents)
    torch.testing.assert_close(layout, want, **TOLERANCE)
    bf16 = TAEHVSession(model, 40, 40, autocast_dtype=torch.bfloat16)
    got = torch.cat([bf16.decode_latents(latents[:, :2]), bf16.decode_latents(latents[:, 2:])], dim=2)
    assert bf16.state.buffers[0].dtype == torch.bfloat16  # the state is kept in the autocast dtype
    # bf16 keeps 8 bits of mantissa through ~40 convolutions: a few uint8 levels on average, no more.
    levels = (frames_to_uint8(got).int() - frames_to_uint8(want).int()).abs().float()
    assert levels.mean() < 3.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_decode_on_a_side_stream_matches_float32_cpu(model, fixture) -> None:
    latents = _latents(fixture)
    want = frames_to_uint8(TAEHVSession(model, 40, 40).decode_latents(latents))
    gpu = build_taehv(device="cuda")
    gpu.load_state_dict(model.state_dict())
    session = TAEHVSession(gpu, 40, 40, autocast_dtype=torch.bfloat16, channels_last=True)
    stream = torch.cuda.Stream()
    got = torch.cat(
        [session.decode_chunk(latents[:, i : i + 2].cuda(), stream=stream, synchronize=True) for i in (0, 2)]
    )
    assert got.shape == want.shape == (13, 40, 40, 3)
    assert (got.cpu().int() - want.int()).abs().float().mean().item() < 3.0

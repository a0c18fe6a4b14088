"""Our `soulx-liveact-tiny` model reproduces upstream SoulX-LiveAct's own forward (tests/fixtures/liveact/).

The fixtures come from tests/oracles/make_liveact_fixtures.py, which ran upstream's
`model_liveact/model_memory.py` WanModel on the CPU in float32 (meta.json names the upstream commit). Here the
weights, stored in upstream's key layout, go through our checkpoint loader unchanged, and every comparison is
float32: the bound is on the max absolute difference, the outputs being O(1) (max |v| ≈ 4–6).

- one forward of the first chunk (audio path with its muted reference frame, I2V image + mask channels, text
  padding) and one of a steady-state chunk whose self-attention reads a cache of sink frames, ConvKV memory
  built by `compress_memory`, neighbour frames and itself;
- upstream's ConvKV compression of the cache and its audio windows, exactly;
- `liveact_rollout` below, a plain (uncached) transcription of LiveAct's streaming schedule on top of
  `WanModel.forward`, reproduces upstream's 6-chunk rollouts (audio CFG 1 and 2) from the same noise: the
  reference the streaming engine is held to (tests/workers/test_streaming_convkv.py, random weights);
- the streaming engine itself (`StreamingDiT` with the 'convkv-memory' window, `engine_rollout` drives it
  with the same inputs) reproduces upstream's rollouts too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proto.model_config import get_model_preset
from proto.stream_config import StreamConfig
from workers.audio import InfiniteTalkAudio, video_frame_windows
from workers.checkpoint import load_dit_checkpoint
from workers.model import KV, WanModel
from workers.streaming import SessionState, StreamingDiT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "liveact"
META = json.loads((FIXTURES / "meta.json").read_text())
BLOCKS = tuple(META["blocks"])  # (6, 8): first chunk, later chunks (latent frames)
WINDOW = sum(BLOCKS)  # 14 latent frames: 2 sink + 2 memory + 2 neighbour + 8 current
VIDEO = META["video_frames_per_window"]  # 53
FIRST_VIDEO = 1 + 4 * (BLOCKS[0] - 1)  # 21: video frames of the first chunk's latents in the window
TIMESTEPS = [float(torch.tensor(t, dtype=torch.float32)) for t in META["timesteps"]]
FORWARD_ATOL = 1e-5
ROLLOUT_ATOL = 2e-5
pytestmark = pytest.mark.equality


@pytest.fixture(scope="module")
def model() -> WanModel:
    m, report = load_dit_checkpoint(
        FIXTURES / "weights.safetensors", get_model_preset(META["preset"]), dtype=torch.float32
    )
    assert report.zero_initialised == () and report.source_dtypes == ("bfloat16",)
    return m


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(FIXTURES / "inputs.safetensors").items()}


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "outputs.safetensors")


def _t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _windows(inputs: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """The `[1, 53, 5, layers, dim]` audio windows of the window starting at video frame `start`."""
    return video_frame_windows(inputs["embedding"], start, start + VIDEO, 2)[None]


def _chunk_audio(windows: torch.Tensor, first: bool) -> InfiniteTalkAudio:
    """The chunk's part of a window: the first chunk's 21 video frames (with the reference frame), or a later
    chunk's 32 (latent frames 6..13 of the window)."""
    if first:
        return InfiniteTalkAudio(windows=windows[:, :FIRST_VIDEO], starts_clip=True)
    return InfiniteTalkAudio(windows=windows[:, FIRST_VIDEO:], starts_clip=False)


def _layout_prefix(model: WanModel, cache: list[KV], frame_tokens: int) -> list[KV]:
    """LiveAct's steady-state cache update on pre-RoPE per-block caches `[B, 14·L, H, D]`: frames 2..6 and
    7..11 compressed into memory frames 2 and 3, neighbour frames 12..13 moved to 4..5; returns the updated
    caches' first 6 frames (sink 0..1, memory 2..3, neighbours 4..5), the current chunk's prefix."""
    n = frame_tokens
    out = []
    for block, (k, v) in zip(model.blocks, cache, strict=True):
        m1 = block.self_attn.compress_memory(k[:, 2 * n : 7 * n], v[:, 2 * n : 7 * n])
        m2 = block.self_attn.compress_memory(k[:, 7 * n : 12 * n], v[:, 7 * n : 12 * n])
        k[:, 2 * n : 3 * n], v[:, 2 * n : 3 * n] = m1
        k[:, 3 * n : 4 * n], v[:, 3 * n : 4 * n] = m2
        k[:, 4 * n : 6 * n], v[:, 4 * n : 6 * n] = (
            k[:, 12 * n : 14 * n].clone(),
            v[:, 12 * n : 14 * n].clone(),
        )
        out.append((k[:, : 6 * n], v[:, : 6 * n]))
    return out


def test_fixture_weights_are_upstreams_key_layout_and_all_load(model: WanModel) -> None:
    weights = load_file(FIXTURES / "weights.safetensors")
    assert set(weights) == set(model.state_dict())
    assert "blocks.1.audio_cross_attn.kv_linear.weight" in weights
    assert "blocks.1.self_attn.memory_proj_k.weight" in weights
    assert "audio_proj.proj1_vf.weight" in weights
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value.float()), key
        assert value.abs().sum() > 0, f"{key} is zero: the oracle must exercise every path"


def test_audio_windows_equal_upstreams(inputs: dict[str, torch.Tensor]) -> None:
    assert torch.equal(_windows(inputs, 0)[0], inputs["chunk0.audio_windows"])
    start = META["cases"]["memory"]["audio_window_start"]
    assert torch.equal(_windows(inputs, start)[0], inputs["memory.audio_windows"])


def test_first_chunk_forward_matches_upstream(
    model: WanModel, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
) -> None:
    def forward(audio: InfiniteTalkAudio | None) -> torch.Tensor:
        with torch.no_grad():
            return model(
                inputs["chunk0.x"][None],
                _t(META["cases"]["chunk0"]["t"]),
                context=inputs["context"][None],
                clip_fea=inputs["clip_fea"][None],
                y=inputs["y"][None, :, : BLOCKS[0]],
                audio=audio,
            )[0]

    expected = outputs["chunk0.velocity"]
    assert (forward(_chunk_audio(_windows(inputs, 0), first=True)) - expected).abs().max() <= FORWARD_ATOL
    # The audio path matters here: without it the output moves by O(1).
    assert (forward(None) - expected).abs().max() > 0.1


def test_steady_state_forward_with_convkv_memory_matches_upstream(
    model: WanModel, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
) -> None:
    case = META["cases"]["memory"]
    n = case["grid"][0] * case["grid"][1] // 4
    cache = [
        (inputs[f"memory.cache_k.{i}"][None].clone(), inputs[f"memory.cache_v.{i}"][None].clone())
        for i in range(len(model.blocks))
    ]
    with torch.no_grad():
        prefix = _layout_prefix(model, cache, n)
        for i, (k, v) in enumerate(cache):
            assert (k[0, 2 * n : 4 * n] - outputs[f"memory.compressed_k.{i}"]).abs().max() <= 1e-6
            assert (v[0, 2 * n : 4 * n] - outputs[f"memory.compressed_v.{i}"]).abs().max() <= 1e-6
        v = model(
            inputs["memory.x"][None],
            _t(case["t"]),
            context=inputs["context"][None],
            clip_fea=inputs["clip_fea"][None],
            y=inputs["y"][None, :, BLOCKS[0] :],
            audio=_chunk_audio(_windows(inputs, case["audio_window_start"]), first=False),
            frame_positions=torch.arange(BLOCKS[0], WINDOW),
            prefix_kv=prefix,
            prefix_frame_positions=torch.arange(BLOCKS[0]),
        )[0]
    assert (v - outputs["memory.velocity"]).abs().max() <= FORWARD_ATOL


class _Capture:
    """The current chunk's pre-RoPE keys and values of every block, `[B, L, H, D]`, from forward hooks on
    `self_attn.norm_k` and `self_attn.v` (prefix tokens are not projected, so only the chunk's appear)."""

    def __init__(self, model: WanModel) -> None:
        self.kv: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
        self.heads = (model.config.num_heads, model.config.head_dim)
        for i, block in enumerate(model.blocks):
            block.self_attn.norm_k.register_forward_hook(self._hook(i, "k"))
            block.self_attn.v.register_forward_hook(self._hook(i, "v"))

    def _hook(self, index: int, name: str):
        def hook(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
            self.kv[index][name] = out.unflatten(-1, self.heads)

        return hook


def liveact_rollout(
    model: WanModel, inputs: dict[str, torch.Tensor], audio_cfg: float, chunks: int
) -> list[torch.Tensor]:
    """LiveAct's streaming schedule (generate.py), uncached, on `WanModel.forward`: each chunk's final latent.

    Per denoising step s (timesteps 1000, 937.5, 833.33; audio only at steps 1 and 2) one pre-RoPE cache of
    14 latent frames per block; chunk 0 (6 frames, positions 0..5) writes frames 0..5, chunk 1 (8 frames,
    positions 6..13) attends to them and writes 6..13; from chunk 2 on, each step's cache is first updated
    (`_layout_prefix`: memory = ConvKV(2..6), ConvKV(7..11); neighbours = 12..13) and the chunk attends to
    frames 0..5 (positions 0..5) and itself (positions 6..13), writing 6..13. Audio CFG adds a pass with zero
    audio windows, its own caches, at steps 1 and 2. Sampler: x0 = x − v·t/1000, then re-noise to the next t.
    """
    grid = META["rollout"]["grid"]
    n = grid[0] * grid[1] // 4
    cfg = model.config
    capture = _Capture(model)
    cross_kv = model.cross_attention_kv(inputs["context"][None], inputs["clip_fea"][None])
    shape = (1, WINDOW * n, cfg.num_heads, cfg.head_dim)

    def fresh() -> list[list[KV]]:
        return [[(torch.zeros(shape), torch.zeros(shape)) for _ in model.blocks] for _ in range(3)]

    caches, null_caches = fresh(), fresh()
    latents = []

    def step(
        chunk: int,
        x: torch.Tensor,
        t: float,
        cache: list[KV],
        audio: InfiniteTalkAudio | None,
        y: torch.Tensor,
    ) -> torch.Tensor:
        first = chunk == 0
        prefix = None
        if chunk == 1:
            prefix = [(k[:, : 6 * n], v[:, : 6 * n]) for k, v in cache]
        elif chunk > 1:
            prefix = _layout_prefix(model, cache, n)
        out = model(
            x[None],
            _t(t),
            cross_kv=cross_kv,
            y=y[None],
            audio=audio,
            frame_positions=torch.arange(0, BLOCKS[0]) if first else torch.arange(BLOCKS[0], WINDOW),
            prefix_kv=prefix,
            prefix_frame_positions=None if first else torch.arange(BLOCKS[0]),
        )[0]
        at = slice(0, 6 * n) if first else slice(6 * n, WINDOW * n)
        for (k, v), kv in zip(cache, capture.kv, strict=True):
            k[:, at], v[:, at] = kv["k"], kv["v"]
        return out

    with torch.no_grad():
        for chunk in range(chunks):
            first = chunk == 0
            windows = _windows(inputs, max(0, (chunk - 1) * 4 * BLOCKS[1]))
            audio = _chunk_audio(windows, first)
            null_audio = _chunk_audio(torch.zeros_like(windows), first)
            y = inputs["rollout.y"][:, : BLOCKS[0]] if first else inputs["rollout.y"][:, BLOCKS[0] :]
            noise = inputs[f"rollout.noise.{chunk}"]
            x = noise[0]
            for s in range(3):
                with_audio = s in META["audio_steps"]
                v = step(chunk, x, TIMESTEPS[s], caches[s], audio if with_audio else None, y)
                if audio_cfg > 1 and with_audio:
                    v_null = step(chunk, x, TIMESTEPS[s], null_caches[s], null_audio, y)
                    v = v_null + audio_cfg * (v - v_null)
                t_now = torch.tensor(TIMESTEPS[s], dtype=torch.float32) / 1000
                t_next = torch.tensor(TIMESTEPS[s + 1], dtype=torch.float32) / 1000
                x0 = x - v * t_now
                x = (1 - t_next) * x0 + (noise[s + 1] if s < 2 else torch.zeros_like(x0)) * t_next
            latents.append(x)
    return latents


@pytest.mark.parametrize("name", ["rollout", "rollout_cfg"])
def test_liveact_schedule_reproduces_upstreams_rollout(
    inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], name: str
) -> None:
    model, _ = load_dit_checkpoint(
        FIXTURES / "weights.safetensors", get_model_preset(META["preset"]), dtype=torch.float32
    )
    chunks = META["rollout"]["chunks"]
    latents = liveact_rollout(model, inputs, META["rollout"]["audio_cfg"][name], chunks)
    for chunk, latent in enumerate(latents):
        assert (latent - outputs[f"{name}.latent.{chunk}"]).abs().max() <= ROLLOUT_ATOL, chunk


def rollout_stream(audio_cfg: float) -> StreamConfig:
    """LiveAct's schedule at the rollout fixtures' size (8x8 latents) and the given audio CFG."""
    grid = META["rollout"]["grid"]
    size = {"height": 8 * grid[0], "width": 8 * grid[1]}
    return StreamConfig.for_schedule("soulx-liveact", **size, audio_cfg=audio_cfg)


def engine_rollout(
    engine: StreamingDiT, inputs: dict[str, torch.Tensor], chunks: int
) -> tuple[list[torch.Tensor], SessionState]:
    """`liveact_rollout`'s inputs through the streaming engine: each chunk's final latent, and the session."""
    state = engine.open_session(inputs["context"], inputs["clip_fea"])
    latents = []
    for chunk in range(chunks):
        first = chunk == 0
        audio = _chunk_audio(_windows(inputs, max(0, (chunk - 1) * 4 * BLOCKS[1])), first)
        y = inputs["rollout.y"][:, : BLOCKS[0]] if first else inputs["rollout.y"][:, BLOCKS[0] :]
        noise = inputs[f"rollout.noise.{chunk}"]
        latents.append(engine.denoise_chunk(state, chunk, y=y, audio=audio, noise=noise))
    return latents, state


@pytest.mark.parametrize("name", ["rollout", "rollout_cfg"])
def test_the_streaming_engine_reproduces_upstreams_rollout(
    model: WanModel, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], name: str
) -> None:
    """The engine (pre-RoPE window cache written in place, ConvKV update per step cache, float32 RoPE tables,
    audio only from step 1, CFG on its own caches) on upstream's weights and inputs: measured <= 4e-6."""
    engine = StreamingDiT(model, rollout_stream(META["rollout"]["audio_cfg"][name]))
    latents, _ = engine_rollout(engine, inputs, META["rollout"]["chunks"])
    for chunk, latent in enumerate(latents):
        assert (latent - outputs[f"{name}.latent.{chunk}"]).abs().max() <= ROLLOUT_ATOL, chunk

"""The SoulX-LiveAct family as data: the infinitetalk audio variant, ConvKV memory, its presets and their
parameter count (proto/model_config.py, workers/model.py, workers/audio.py). Equivalence with upstream's own
forward is tests/oracles/test_liveact_equivalence.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from proto.model_config import (
    ConvKVMemoryConfig,
    InfiniteTalkAudioConfig,
    ModelConfig,
    get_model_preset,
)
from proto.stream_config import StreamConfig
from workers.audio import AudioConditioning, InfiniteTalkAudio, video_frame_windows
from workers.checkpoint import CheckpointError, is_audio_key, load_dit_checkpoint, save_dit_checkpoint
from workers.inspect import describe_preset, run_inspect
from workers.model import WanModel
from workers.rope import grid_positions, rope_cos_sin
from workers.streaming import StreamingDiT

TINY = get_model_preset("soulx-liveact-tiny")
FIXTURE_META = Path(__file__).resolve().parents[1] / "fixtures" / "liveact" / "meta.json"


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def test_soulx_liveact_has_18_884_094_784_parameters_derived_from_upstreams_module_shapes() -> None:
    """Arithmetic from upstream's constructors (model_liveact/model_memory.py, attention.py) at the published
    model's arguments: Wan 2.1 I2V-14B (dim 5120, ffn 13824, 40 layers, in_dim 36, text_dim 4096, freq_dim
    256, CLIP 1280) + per block `audio_cross_attn` (SingleStreamAttention: q_linear, kv_linear 768 → 2·dim,
    proj, all biased, qk_norm=False so no norms) and `norm_x` (affine LayerNorm) + per block
    `memory_proj_k/v` (depthwise Conv1d(dim, dim, 5, groups=dim, bias=False): dim·5 each) + `audio_proj`
    (AudioProjModel: proj1 5·12·768 → 512, proj1_vf 8·12·768 → 512, proj2 512 → 512, proj3 512 → 32·768,
    LayerNorm(768) as norm_output_audio defaults to True). Upstream's own WanModel built on the meta device
    by tests/oracles/make_liveact_fixtures.py counted the same (meta.json)."""
    d, ffn, layers = 5120, 13824, 40
    block = {
        "self_attn q, k, v, o + norm_q, norm_k": 4 * _linear(d, d) + 2 * d,
        "cross_attn q, k, v, o, k_img, v_img + three RMSNorms": 6 * _linear(d, d) + 3 * d,
        "norm3": 2 * d,
        "ffn": _linear(d, ffn) + _linear(ffn, d),
        "modulation": 6 * d,
    }
    wan_parts = {
        "patch_embedding": 36 * d * 2 * 2 + d,
        "text_embedding": _linear(4096, d) + _linear(d, d),
        "time_embedding": _linear(256, d) + _linear(d, d),
        "time_projection": _linear(d, 6 * d),
        "head + its modulation": _linear(d, 16 * 4) + 2 * d,
        "img_emb": 2 * 1280 + _linear(1280, 1280) + _linear(1280, d) + 2 * d,
        "blocks": layers * sum(block.values()),
    }
    wan = sum(wan_parts.values())
    audio_blocks = layers * (_linear(d, d) + _linear(768, 2 * d) + _linear(d, d) + 2 * d)
    memory = layers * 2 * d * 5
    audio_proj = sum(
        [
            _linear(5 * 12 * 768, 512),  # proj1
            _linear(8 * 12 * 768, 512),  # proj1_vf
            _linear(512, 512),  # proj2
            _linear(512, 32 * 768),  # proj3
            2 * 768,  # norm
        ]
    )
    total = wan + audio_blocks + memory + audio_proj
    assert wan == 16_394_878_784
    assert audio_blocks + audio_proj == 2_487_168_000
    assert memory == 2_048_000
    assert total == 18_884_094_784
    p = describe_preset("soulx-liveact")["parameters"]
    assert (p["total"], p["wan"], p["audio"], p["memory"]) == (total, wan, audio_blocks + audio_proj, memory)
    assert p["parts"]["blocks (audio cross-attn)"] == audio_blocks
    assert p["parts"]["audio_proj"] == audio_proj
    assert json.loads(FIXTURE_META.read_text())["published_parameters"] == total
    assert "18,884,094,784" in run_inspect("soulx-liveact")


def test_soulx_liveact_is_i2v_14b_plus_the_infinitetalk_audio_module_and_memory() -> None:
    live = get_model_preset("soulx-liveact")
    base = get_model_preset("wan2.1-i2v-14b")
    same = dataclasses.replace(
        live, name=base.name, audio=None, memory=None, stream_schedule="talkingmachines"
    )
    assert same == base
    assert live.audio == InfiniteTalkAudioConfig(mute_reference_frame=True)
    assert live.memory == ConvKVMemoryConfig(ratio=5, values_use_key_conv=True)
    assert live.audio_variant == "infinitetalk"
    assert live.stream_schedule == "soulx-liveact"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio_window": 4}, "audio_window must be a positive odd int"),
        ({"vae_scale": 1}, "vae_scale must be an int >= 2"),
        ({"context_tokens": 0}, "context_tokens must be a positive int"),
        ({"mute_reference_frame": 1}, "mute_reference_frame must be a bool"),
    ],
)
def test_infinitetalk_audio_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InfiniteTalkAudioConfig(**kwargs)


def test_memory_config_and_variant_constraints_are_validated() -> None:
    with pytest.raises(ValueError, match="ratio must be a positive int"):
        ConvKVMemoryConfig(ratio=0)
    with pytest.raises(ValueError, match="infinitetalk audio variant is i2v only"):
        ModelConfig(name="bad", audio=InfiniteTalkAudioConfig())
    with pytest.raises(ValueError, match="memory must be a ConvKVMemoryConfig"):
        ModelConfig(name="bad", memory=5)  # type: ignore[arg-type]


def test_talkingmachines_presets_gain_no_family_modules() -> None:
    with torch.device("meta"):
        keys = WanModel(get_model_preset("tiny")).state_dict().keys()
    assert not [k for k in keys if "norm_x" in k or "memory_proj" in k or "audio_cross_attn" in k]
    assert is_audio_key("blocks.3.norm_x.weight") and is_audio_key("audio_proj.proj1_vf.bias")
    assert not is_audio_key("blocks.3.self_attn.memory_proj_k.weight")


@pytest.fixture(scope="module")
def model() -> WanModel:
    torch.manual_seed(0)
    m = WanModel(TINY)
    m.init_weights(zero_head=False, zero_audio=False)
    return m.eval()


def _inputs(frames: int, grid: tuple[int, int] = (4, 6)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(1, 16, frames, *grid, generator=g),
        "y": torch.randn(1, 20, frames, *grid, generator=g),
        "context": torch.randn(1, 8, TINY.text_dim, generator=g),
        "clip_fea": torch.randn(1, TINY.clip_tokens, TINY.clip_dim, generator=g),
    }


def _windows(video_frames: int, seed: int = 2) -> torch.Tensor:
    audio = TINY.audio
    assert isinstance(audio, InfiniteTalkAudioConfig)
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(video_frames + 10, audio.wav2vec_layers, audio.wav2vec_dim, generator=g)
    return video_frame_windows(embedding, 0, video_frames, audio.half_window)[None]


def _forward(model: WanModel, inputs: dict[str, torch.Tensor], audio: object) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["x"],
            torch.tensor([900.0]),
            audio=audio,
            **{k: inputs[k] for k in ("y", "context", "clip_fea")},
        )


def test_video_frame_windows_centre_each_frame_and_clamp_at_the_clip_edges() -> None:
    embedding = torch.arange(6.0)[:, None]
    windows = video_frame_windows(embedding, 0, 6, 2)[..., 0]
    assert windows[0].tolist() == [0, 0, 0, 1, 2]
    assert windows[3].tolist() == [1, 2, 3, 4, 5]
    assert windows[5].tolist() == [3, 4, 5, 5, 5]


def test_the_projection_treats_the_reference_frame_apart_and_later_frames_alike(model: WanModel) -> None:
    windows = _windows(1 + 4 * 3)
    with torch.no_grad():
        clip = model.audio_proj(windows, starts_clip=True)
        later = model.audio_proj(windows[:, 1:], starts_clip=False)
        last = model.audio_proj(windows[:, 9:], starts_clip=False)
    assert clip.shape == (1, 4, 32, 16)
    assert torch.allclose(clip[:, 1:], later, atol=1e-6)  # later frames do not depend on the reference frame
    assert torch.allclose(clip[:, 3:], last, atol=1e-6)  # nor on each other
    with pytest.raises(ValueError, match=r"expected \[B, 1 \+ 4·F, 5, 2, 32\]"):
        model.audio_proj(windows[:, :12], starts_clip=True)


def test_each_latent_frame_attends_only_to_its_own_audio_tokens(model: WanModel) -> None:
    attn = model.blocks[0].audio_cross_attn
    x = torch.randn(1, 3 * 24, TINY.dim)
    tokens = torch.randn(1, 3, 32, 16)
    changed = tokens.clone()
    changed[:, 1] += 1.0
    with torch.no_grad():
        a, b = attn(x, attn.kv(tokens)), attn(x, attn.kv(changed))
    diff = (a - b).abs().view(3, 24, -1).amax(dim=(1, 2))
    assert diff[0] == 0 and diff[2] == 0 and diff[1] > 1e-3


def test_a_clips_reference_frame_gets_no_audio_and_later_chunks_do(model: WanModel) -> None:
    inputs = _inputs(3)
    tokens = torch.randn(1, 3, 32, 16)
    first_changed = tokens.clone()
    first_changed[:, 0] = torch.randn(32, 16)
    out = {
        (start, name): _forward(model, inputs, InfiniteTalkAudio(tokens=t, starts_clip=start))
        for start in (True, False)
        for name, t in (("a", tokens), ("b", first_changed))
    }
    assert torch.equal(out[True, "a"], out[True, "b"])  # muted: frame 0's tokens reach nothing
    assert (out[False, "a"] - out[False, "b"]).abs().max() > 1e-3
    unmuted = dataclasses.replace(TINY, audio=dataclasses.replace(TINY.audio, mute_reference_frame=False))
    assert not model.mutes_first_frame(None)  # no audio: nothing to mute
    plain = WanModel(unmuted)
    plain.load_state_dict(model.state_dict())
    again = _forward(plain.eval(), inputs, InfiniteTalkAudio(tokens=first_changed, starts_clip=True))
    assert (again - out[True, "b"]).abs().max() > 1e-3


def test_a_fresh_audio_path_leaves_the_output_unchanged() -> None:
    torch.manual_seed(0)
    fresh = WanModel(TINY).eval()
    inputs = _inputs(2)
    with_audio = _forward(fresh, inputs, InfiniteTalkAudio(windows=_windows(1 + 4), starts_clip=True))
    assert torch.equal(with_audio, _forward(fresh, inputs, None))


def test_the_variant_takes_its_own_audio_inputs(model: WanModel) -> None:
    features = AudioConditioning(tokens=torch.zeros(1, 1, 2, 32, 16))
    with pytest.raises(ValueError, match="infinitetalk audio variant and takes InfiniteTalkAudio"):
        _forward(model, _inputs(2), features)
    with pytest.raises(ValueError, match="audio covers 3 latent frames"):
        _forward(model, _inputs(2), InfiniteTalkAudio(tokens=torch.zeros(1, 3, 32, 16)))


def test_compress_memory_merges_runs_of_ratio_tokens() -> None:
    torch.manual_seed(0)
    attn = WanModel(TINY).blocks[0].self_attn  # memory convolutions initialised to 1/ratio: a plain mean
    k, v = torch.randn(2, 2, 40, 4, 32).unbind(0)
    mk, mv = attn.compress_memory(k, v)
    assert mk.shape == (2, 8, 4, 32)
    assert torch.allclose(mk, k.unflatten(1, (8, 5)).mean(2), atol=1e-6)
    assert torch.allclose(mv, v.unflatten(1, (8, 5)).mean(2), atol=1e-6)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            attn.compress_memory(k, v, mean=True),
            (k.unflatten(1, (8, 5)).mean(2), v.unflatten(1, (8, 5)).mean(2)),
            strict=True,
        )
    )
    with torch.no_grad():
        attn.memory_proj_k.weight.copy_(torch.randn(TINY.dim, 1, 5))
        attn.memory_proj_v.weight.zero_()
    mk, mv = attn.compress_memory(k, v)
    # Upstream compresses the values with the key convolution as well: memory_proj_v is unused.
    weight = attn.memory_proj_k.weight[:, 0].view(4, 32, 5)  # [H, D, 5]
    expected = torch.einsum("bnthd,hdt->bnhd", v.unflatten(1, (8, 5)), weight)
    assert torch.allclose(mv, expected, atol=1e-5)
    attn.memory = ConvKVMemoryConfig(values_use_key_conv=False)
    assert torch.equal(attn.compress_memory(k, v)[1], torch.zeros_like(mv))
    with pytest.raises(ValueError, match="N a multiple of 5"):
        attn.compress_memory(k[:, :7], v[:, :7])


def test_a_liveact_checkpoint_without_audio_loads_zero_filled_but_memory_is_required(
    model: WanModel, tmp_path: Path
) -> None:
    path = save_dit_checkpoint(model, tmp_path / "full.safetensors")
    loaded, report = load_dit_checkpoint(path, TINY)
    assert report.zero_initialised == ()
    state = {k: v for k, v in model.state_dict().items() if not is_audio_key(k)}
    stripped = WanModel(dataclasses.replace(TINY, audio=None))
    stripped.load_state_dict(state)
    path = save_dit_checkpoint(stripped, tmp_path / "plain.safetensors")
    loaded, report = load_dit_checkpoint(path, TINY)
    assert "blocks.0.norm_x.weight" in report.zero_initialised
    assert "audio_proj.proj1.weight" in report.zero_initialised
    inputs = _inputs(2)
    audio = InfiniteTalkAudio(windows=_windows(1 + 4), starts_clip=True)
    assert torch.equal(_forward(loaded, inputs, audio), _forward(loaded, inputs, None))
    no_memory = WanModel(dataclasses.replace(TINY, memory=None))
    path = save_dit_checkpoint(no_memory, tmp_path / "no_memory.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks key blocks\.0\.self_attn\.memory_proj_k\.weight"):
        load_dit_checkpoint(path, TINY)


def test_a_liveact_checkpoint_for_the_tiny_preset_names_the_family(model: WanModel, tmp_path: Path) -> None:
    path = save_dit_checkpoint(model, tmp_path / "live.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_dit_checkpoint(path, get_model_preset("tiny"))
    message = str(err.value)
    assert "infinitetalk audio layers, ConvKV memory" in message
    assert "it looks like preset 'soulx-liveact-tiny', not 'tiny'" in message


def test_the_talkingmachines_engine_refuses_a_liveact_model(model: WanModel) -> None:
    with pytest.raises(ValueError, match=r"not the 'sparse-causal' window; stream it with StreamConfig\.for"):
        StreamingDiT(model, StreamConfig(height=64, width=64))
    StreamingDiT(model, StreamConfig.for_schedule(TINY.stream_schedule, height=64, width=64))  # its own


def test_forward_step_runs_the_infinitetalk_audio_from_per_block_keys_values(model: WanModel) -> None:
    """The streaming pass (`forward_step`, keys/values written into a cache buffer, audio projected once per
    chunk by `WanModel.audio_kv`) equals the reference forward for a clip's first chunk."""
    inputs = _inputs(2)
    audio = InfiniteTalkAudio(windows=_windows(1 + 4), starts_clip=True)
    expected = _forward(model, inputs, audio)
    with torch.no_grad():
        e, e0 = model.time_embed(torch.full((1, 2), 900.0))
        cos, sin = rope_cos_sin(TINY, grid_positions(torch.arange(2), 2, 3))
        tokens, _ = model.audio_inputs(audio, 2)
        length = 2 * 6
        cache = torch.zeros(2, TINY.num_layers, 1, length, TINY.num_heads, TINY.head_dim)
        out = model.forward_step(
            inputs["x"],
            e,
            e0,
            (cos.float(), sin.float()),
            cache[0],
            cache[1],
            0,
            length,
            model.cross_attention_kv(inputs["context"], inputs["clip_fea"]),
            y=inputs["y"],
            audio_kv=model.audio_kv(tokens),
            mute_first_frame=model.mutes_first_frame(audio),
        )
    assert (out - expected).abs().max() < 1e-5

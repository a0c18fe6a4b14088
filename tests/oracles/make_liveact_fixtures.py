"""Write tests/fixtures/liveact/: SoulX-LiveAct's own model run at a tiny size, numbers our model must match.

Upstream's code cannot live in this repository, so this script imports it from a checkout given on the
command line, runs it on the CPU in float32 and saves only numbers: the seeded random weights in upstream's
key layout, the inputs, and upstream's outputs. tests/oracles/test_liveact_equivalence.py (CI, no upstream
needed) loads the weights into our `soulx-liveact-tiny` model through `workers.checkpoint` and compares.

Run (from the repository root; upstream needs einops and diffusers, kept out of the project's environment):

    python -m pip install --target /tmp/liveact-oracle-deps --no-deps einops==0.8.2 diffusers==0.42.1
    git -C /path/to/SoulX-LiveAct.git worktree add /tmp/up-liveact ac8579b907756f228e975922a5159765c93c6a34
    PYTHONPATH=/tmp/liveact-oracle-deps python tests/oracles/make_liveact_fixtures.py \
        --upstream /tmp/up-liveact

(`--upstream` is a directory holding upstream's `model_liveact/`, `fp8_gemm.py`, `fp4_gemm.py` and
`util_liveact.py`; a bare mirror can be unpacked with `git show HEAD:<path>` per file. Run it from a directory
that is not /tmp if /tmp holds stray Python packages.)

What runs is upstream's `model_liveact.model_memory.WanModel.forward` (the single-GPU model of generate.py)
and `util_liveact.get_audio_emb`; shims, applied here only, make it run on the CPU in float32:
- `sdpa_attention` → plain `scaled_dot_product_attention` in the inputs' dtype (upstream casts q, k, v to
  bfloat16 first), sage attention off;
- `WanSelfAttention._load_kv_cache` gets device "cpu" and dtype float32 (upstream hard-codes "cuda:{RANK}" and
  converts the cache to bfloat16).
The tiny model is upstream's WanModel at the dims of our `soulx-liveact-tiny` preset; its `img_emb` and
`audio_proj` are rebuilt with upstream's own classes at the preset's CLIP width and wav2vec2 size (upstream
hard-codes 1280 and 12×768 there). Every parameter is drawn at random (none zero: the audio path's output
is live) and rounded to bfloat16, so the weights are stored losslessly as bfloat16.

Cases (all float32):
- `chunk0`: one forward as generate.py's first chunk at its second step: 6 latent frames, t = 937.5,
  start_idx 0, audio on (the reference frame's audio output is zeroed by upstream), fresh caches.
- `memory`: one forward as a steady-state chunk: 8 latent frames, t = 833.33, start_idx 6·L, end_idx 14·L,
  update_cache=True, on a cache pre-filled with random keys/values: upstream compresses cache frames 2..6 and
  7..11 with the ConvKV memory, moves 12..13 to 4..5 and attends over 14 frames. The cache after the call
  (its memory frames 2..3) is saved too.
- `rollout`: generate.py's loop transcribed (same arguments to `WanModel.forward`, same sampler arithmetic)
  for 6 chunks with fixed noise, audio_cfg 1 (the default); `rollout_cfg`: the same noise with audio_cfg 2.
  See meta.json["rollout"] for the exact schedule.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from proto.model_config import InfiniteTalkAudioConfig, get_model_preset  # noqa: E402

PRESET = "soulx-liveact-tiny"
SEED = 20260316
TIMESTEPS = (1000.0, 937.5, 833.33333333, 0.0)  # generate.py's schedule (steps 0, 1, 2 and the end)
BLOCKS = (6, 8)  # generate.py's blksz_lst: the first chunk's latent frames, then every later chunk's
AUDIO_STEPS = (1, 2)  # generate.py runs the audio path only at these steps (skip_audio at step 0)
HALF_WINDOW = 2
VIDEO_FRAMES = (sum(BLOCKS) - 1) * 4 + 1  # 53: the video frames of one 14-latent-frame window
SINGLE_GRID = (8, 12)  # latent height, width of the one-forward cases: 4x6 = 24 tokens per frame
ROLLOUT_GRID = (8, 8)  # 4x4 = 16 tokens per frame
ROLLOUT_CHUNKS = 6


def _shim(mm: Any) -> None:
    """Make upstream's model run on the CPU in float32 (see the module docstring)."""

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    mm.USE_SAGEATTN = False
    mm.sdpa_attention = sdpa
    load = mm.WanSelfAttention._load_kv_cache
    mm.WanSelfAttention._load_kv_cache = lambda self, cache, device, dtype: load(
        self, cache, "cpu", torch.float32
    )


def _upstream_model(mm: Any) -> Any:
    """Upstream's WanModel at the tiny preset's dims, every parameter random and bfloat16-representable."""
    cfg = get_model_preset(PRESET)
    audio = cfg.audio
    assert isinstance(audio, InfiniteTalkAudioConfig) and cfg.memory is not None
    assert cfg.memory.ratio == 5 and cfg.clip_tokens == 257 and cfg.patch_size == (1, 2, 2)
    model = mm.WanModel(
        model_type="i2v",
        patch_size=cfg.patch_size,
        text_len=cfg.text_len,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        audio_window=audio.audio_window,
        intermediate_dim=audio.intermediate_dim,
        output_dim=audio.output_dim,
        context_tokens=audio.context_tokens,
        vae_scale=audio.vae_scale,
        norm_input_visual=audio.norm_input_visual,
        norm_output_audio=audio.norm_output_audio,
    )
    model.img_emb = mm.MLPProj(cfg.clip_dim, cfg.dim)
    model.audio_proj = mm.AudioProjModel(
        seq_len=audio.audio_window,
        seq_len_vf=audio.later_frame_taps,
        blocks=audio.wav2vec_layers,
        channels=audio.wav2vec_dim,
        intermediate_dim=audio.intermediate_dim,
        output_dim=audio.output_dim,
        context_tokens=audio.context_tokens,
        norm_output_audio=audio.norm_output_audio,
    )
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("memory_proj_k.weight") or name.endswith("memory_proj_v.weight"):
                value = 0.2 + 0.1 * noise  # around upstream's 1/5 initialisation
            elif param.ndim == 1 and ("norm" in name or name.startswith("img_emb.proj.0")):
                value = (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
            elif name.endswith("modulation"):
                value = noise / param.shape[-1] ** 0.5
            elif param.ndim == 1:  # biases
                value = 0.05 * noise
            else:
                fan_in = param[0].numel()
                value = noise / fan_in**0.5
            param.copy_(value.bfloat16().float())
    return model.eval()


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """A random input rounded to bfloat16 (stored as bfloat16 without loss, used in float32)."""
    return t.bfloat16().float()


def _fresh_cache(model: Any, frame_tokens: int) -> dict[int, dict[str, Any]]:
    """One step's per-layer cache as generate.py allocates it (float32, on the CPU, no FP8, no offload)."""
    cfg = get_model_preset(PRESET)
    shape = (1, sum(BLOCKS) * frame_tokens, cfg.num_heads, cfg.head_dim)
    return {
        layer: {
            "k": torch.zeros(shape),
            "v": torch.zeros(shape),
            "k_scale": None,
            "v_scale": None,
            "mean_memory": False,
            "offload_cache": False,
            "fp8_kv_cache": False,
        }
        for layer in range(len(model.blocks))
    }


def _i2v_condition(gen: torch.Generator, grid: tuple[int, int]) -> torch.Tensor:
    """y `[1, 20, 14, h, w]` as generate.py builds it: 4 mask channels (1 on latent frame 0, else 0) and 16
    image-latent channels (random here; upstream: the VAE latent of the reference frame + black frames)."""
    h, w = grid
    mask = torch.zeros(1, 4, sum(BLOCKS), h, w)
    mask[:, :, 0] = 1.0
    latents = _bf16(torch.randn(1, 16, sum(BLOCKS), h, w, generator=gen))
    return torch.cat([mask, latents], dim=1)


def _call(
    model: Any,
    latent: torch.Tensor,
    t: float,
    cache: dict,
    *,
    chunk: int,
    audio: torch.Tensor,
    y: torch.Tensor,
    common: dict[str, Any],
    skip_audio: bool,
) -> torch.Tensor:
    """One `WanModel.forward` with generate.py's arguments for chunk `chunk` (0, 1 or later)."""
    f = min(chunk, 1)
    frame_tokens = latent.shape[-2] * latent.shape[-1] // 4
    return model(
        [latent],
        t=torch.tensor([t], dtype=torch.float32),
        kv_cache=cache,
        skip_audio=skip_audio,
        audio=audio,
        y=y[:, :, sum(BLOCKS[:f]) : sum(BLOCKS[: f + 1])],
        start_idx=sum(BLOCKS[:f]) * frame_tokens,
        end_idx=sum(BLOCKS[: f + 1]) * frame_tokens,
        update_cache=chunk > 1,
        **common,
    )[0]


def _audio_start(chunk: int) -> int:
    """generate.py's first video frame of chunk `chunk`'s 53-frame audio window."""
    return max(0, (chunk - 1) * BLOCKS[1] * 4)


def _rollout(
    model: Any,
    util: Any,
    noise: list[torch.Tensor],
    embedding: torch.Tensor,
    y: torch.Tensor,
    common: dict[str, Any],
    audio_cfg: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """generate.py's loop (non-streaming audio) with the given noise: per chunk its final latent and the
    velocity of every step (after audio CFG)."""
    frame_tokens = ROLLOUT_GRID[0] * ROLLOUT_GRID[1] // 4
    caches = {i: _fresh_cache(model, frame_tokens) for i in range(len(TIMESTEPS) - 1)}
    null_caches = {i: _fresh_cache(model, frame_tokens) for i in range(len(TIMESTEPS) - 1)}
    latents, velocities = [], []
    for chunk in range(ROLLOUT_CHUNKS):
        start = _audio_start(chunk)
        audio = util.get_audio_emb(embedding, start, start + VIDEO_FRAMES, "cpu")
        latent = noise[chunk][0]
        chunk_velocities = []
        for i in range(len(TIMESTEPS) - 1):
            skip = i not in AUDIO_STEPS
            v = _call(
                model,
                latent,
                TIMESTEPS[i],
                caches[i],
                chunk=chunk,
                audio=audio,
                y=y,
                common=common,
                skip_audio=skip,
            )
            if audio_cfg > 1.0 and not skip:
                v_null = _call(
                    model,
                    latent,
                    TIMESTEPS[i],
                    null_caches[i],
                    chunk=chunk,
                    audio=torch.zeros_like(audio),
                    y=y,
                    common=common,
                    skip_audio=False,
                )
                v = v_null + audio_cfg * (v - v_null)
            chunk_velocities.append(v)
            t_now = torch.tensor([TIMESTEPS[i]], dtype=torch.float32)
            t_next = torch.tensor([TIMESTEPS[i + 1]], dtype=torch.float32)
            x0 = latent + (-v) * (t_now[0] / 1000 - 0.0)
            fresh = noise[chunk][i + 1] if i + 1 < len(TIMESTEPS) - 1 else torch.zeros_like(x0)
            latent = (1 - t_next[0] / 1000) * x0 + fresh * (t_next[0] / 1000)
        latents.append(latent)
        velocities.append(torch.stack(chunk_velocities))
    return latents, velocities


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--upstream", type=Path, required=True, help="SoulX-LiveAct checkout (model_liveact/)"
    )
    parser.add_argument(
        "--commit", default=None, help="upstream commit, when --upstream is not a git work tree"
    )
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "liveact")
    args = parser.parse_args()

    sys.path.insert(0, str(args.upstream.resolve()))
    mm = importlib.import_module("model_liveact.model_memory")
    util = importlib.import_module("util_liveact")
    _shim(mm)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = _upstream_model(mm)
    cfg = get_model_preset(PRESET)
    gen = torch.Generator().manual_seed(SEED + 1)

    context = _bf16(torch.randn(10, cfg.text_dim, generator=gen))  # 10 of text_len=16 tokens: padding runs
    clip_fea = _bf16(torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=gen))
    audio_cfg = cfg.audio
    assert isinstance(audio_cfg, InfiniteTalkAudioConfig)
    # Per-video-frame wav2vec2 hidden states [T, layers, dim], long enough for every rollout window.
    embedding_frames = _audio_start(ROLLOUT_CHUNKS - 1) + VIDEO_FRAMES - 3  # the last window is clamped
    embedding = _bf16(
        torch.randn(embedding_frames, audio_cfg.wav2vec_layers, audio_cfg.wav2vec_dim, generator=gen)
    )

    def common(grid: tuple[int, int]) -> dict[str, Any]:
        return {
            "context": [context],
            "clip_fea": clip_fea,
            "ref_target_masks": torch.ones(3, *grid),
        }

    tensors: dict[str, torch.Tensor] = {"context": context, "clip_fea": clip_fea[0], "embedding": embedding}
    outputs: dict[str, torch.Tensor] = {}
    h, w = SINGLE_GRID
    frame_tokens = h * w // 4
    y = _i2v_condition(gen, SINGLE_GRID)
    tensors["y"] = y[0]

    with torch.no_grad():
        # chunk0: the first chunk's second step (audio on), fresh caches.
        x = _bf16(torch.randn(16, BLOCKS[0], h, w, generator=gen))
        audio = util.get_audio_emb(embedding, 0, VIDEO_FRAMES, "cpu")
        tensors["chunk0.x"] = x
        tensors["chunk0.audio_windows"] = audio[0]
        outputs["chunk0.velocity"] = _call(
            model,
            x,
            TIMESTEPS[1],
            _fresh_cache(model, frame_tokens),
            chunk=0,
            audio=audio,
            y=y,
            common=common(SINGLE_GRID),
            skip_audio=False,
        )

        # memory: a steady-state chunk (chunk 2's audio window) on a random pre-filled cache.
        x = _bf16(torch.randn(16, BLOCKS[1], h, w, generator=gen))
        start = _audio_start(2)
        audio = util.get_audio_emb(embedding, start, start + VIDEO_FRAMES, "cpu")
        cache = _fresh_cache(model, frame_tokens)
        for layer, entry in cache.items():
            for name in ("k", "v"):
                entry[name] = _bf16(torch.randn(entry[name].shape, generator=gen))
                tensors[f"memory.cache_{name}.{layer}"] = entry[name][0].clone()
        tensors["memory.x"] = x
        tensors["memory.audio_windows"] = audio[0]
        outputs["memory.velocity"] = _call(
            model,
            x,
            TIMESTEPS[2],
            cache,
            chunk=2,
            audio=audio,
            y=y,
            common=common(SINGLE_GRID),
            skip_audio=False,
        )
        for layer, entry in cache.items():
            for name in ("k", "v"):
                outputs[f"memory.compressed_{name}.{layer}"] = entry[name][
                    0, 2 * frame_tokens : 4 * frame_tokens
                ]

        # rollout: generate.py's loop, fixed noise; rollout_cfg: the same noise with audio CFG 2.
        rh, rw = ROLLOUT_GRID
        y_roll = _i2v_condition(gen, ROLLOUT_GRID)
        tensors["rollout.y"] = y_roll[0]
        noise = []
        for chunk in range(ROLLOUT_CHUNKS):
            frames = BLOCKS[min(chunk, 1)]
            noise.append(_bf16(torch.randn(len(TIMESTEPS) - 1, 16, frames, rh, rw, generator=gen)))
            tensors[f"rollout.noise.{chunk}"] = noise[-1]
        for name, cfg_scale in (("rollout", 1.0), ("rollout_cfg", 2.0)):
            latents, velocities = _rollout(
                model, util, noise, embedding, y_roll, common(ROLLOUT_GRID), cfg_scale
            )
            for chunk, (latent, velocity) in enumerate(zip(latents, velocities, strict=True)):
                outputs[f"{name}.latent.{chunk}"] = latent
                if name == "rollout":
                    outputs[f"{name}.velocity.{chunk}"] = velocity

    args.out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(weights[k].float(), v) for k, v in model.state_dict().items())
    save_file(weights, str(args.out / "weights.safetensors"))
    save_file(
        {k: v.contiguous().to(torch.bfloat16) for k, v in tensors.items()},
        str(args.out / "inputs.safetensors"),
    )
    save_file({k: v.contiguous().float() for k, v in outputs.items()}, str(args.out / "outputs.safetensors"))

    with torch.device("meta"):
        published = mm.WanModel(
            model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36
        )
    meta = {
        "upstream": "https://github.com/Soul-AILab/SoulX-LiveAct",
        "upstream_commit": args.commit or _git_commit(args.upstream),
        "upstream_model": "model_liveact/model_memory.py WanModel (generate.py's single-GPU model)",
        "preset": PRESET,
        "dtype": "float32 compute; weights and inputs stored as bfloat16 (exactly representable values)",
        "seed": SEED,
        "published_parameters": sum(p.numel() for p in published.parameters()),
        "published_parameters_note": "upstream WanModel(model_type='i2v', dim=5120, ffn_dim=13824, "
        "num_heads=40, num_layers=40, in_dim=36) built on the meta device, other arguments at their defaults",
        "timesteps": list(TIMESTEPS),
        "blocks": list(BLOCKS),
        "audio_steps": list(AUDIO_STEPS),
        "video_frames_per_window": VIDEO_FRAMES,
        "cases": {
            "chunk0": {
                "grid": list(SINGLE_GRID),
                "t": TIMESTEPS[1],
                "start_idx_frames": 0,
                "end_idx_frames": 6,
                "update_cache": False,
                "skip_audio": False,
                "audio_window_start": 0,
            },
            "memory": {
                "grid": list(SINGLE_GRID),
                "t": TIMESTEPS[2],
                "start_idx_frames": 6,
                "end_idx_frames": 14,
                "update_cache": True,
                "skip_audio": False,
                "audio_window_start": _audio_start(2),
                "cache": "memory.cache_{k,v}.{layer} [14·L, H, D] before the call (pre-RoPE)",
            },
        },
        "rollout": {
            "grid": list(ROLLOUT_GRID),
            "chunks": ROLLOUT_CHUNKS,
            "audio_cfg": {"rollout": 1.0, "rollout_cfg": 2.0},
            "noise": "rollout.noise.{c} [3, 16, F, h, w]: [0] the chunk's initial latent, [1] and [2] the "
            "fresh noise of the re-noising after steps 0 and 1 (after step 2 the next timestep is 0: none)",
            "schedule": "per chunk c (F = 6 if c == 0 else 8), per step i in 0..2 with its own cache: "
            "v = WanModel.forward([latent], t=[timesteps[i]], kv_cache=caches[i], skip_audio=(i == 0), "
            "audio=get_audio_emb(embedding, s, s + 53) with s = max(0, (c - 1)·32), y=y[:, :, 0:6] if "
            "c == 0 else y[:, :, 6:14], start_idx=(0 if c == 0 else 6)·L, end_idx=(6 if c == 0 else 14)·L, "
            "update_cache=(c > 1), context, clip_fea, ref_target_masks=ones); with audio_cfg > 1 at steps "
            "1, 2 also v_null with audio zeros and its own caches, v = v_null + cfg·(v − v_null); then "
            "x0 = latent − v·t_i/1000 and latent = (1 − t_{i+1}/1000)·x0 + noise·t_{i+1}/1000 (float32)",
            "outputs": "rollout.latent.{c} (the chunk's final latent = x0 of step 2), rollout.velocity.{c} "
            "[3, 16, F, h, w], rollout_cfg.latent.{c}",
        },
        "tolerance": "float32; tests/oracles/test_liveact_equivalence.py states max-abs bounds",
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(json.dumps({"out": str(args.out), "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()

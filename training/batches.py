"""Clips → DiT inputs, through the same front-ends inference uses.

A clip (training.data.Clip: video uint8 `[T, H, W, 3]`, audio float32 `[T·1000]` at 16 kHz, per-character
speaking flags `[C, T]`, face boxes `[C, 4]` px, reference image `[H, W, 3]`) becomes:

- latents: `WanVAE.encode` of the video, normalised, `[16, L, H/8, W/8]`, cropped to K whole chunks of
  `chunk_latents` (L = K·F; Wan's 81 frames give 21 latents = 7 chunks of 3);
- y: the I2V conditioning `decoder.encode.I2VConditioning` (mask + latents of [image, gray, …]), `[20, L, …]`;
- context / clip_fea: the prompt and the reference image through `frontends.conditioning.ConditioningEncoders`
  (the seeded tiny random umT5/CLIP `talkingmachines run` uses by default, seed 0);
- audio: per character, `frontends.audio_features.AudioFeaturizer` fed the whole clip and asked for every
  chunk, exactly as a stream would: per chunk its span `[F + W − 1, P, layers, dim]` and speaking flags `[F]`.
  The DiT's audio tokens are projected chunk by chunk from these spans (`ChunkAudioWanModel`), so
  training sees bit for bit the windows inference sees (look-ahead truncated at the chunk's edge included).
- face_mask `[C, L·S]`: one character gets the whole frame (what `run` sends, box [0, 0, 1, 1]); with
  several, each character's face box (`face_token_mask`). Clips are padded to `max_characters` with silent
  characters whose mask is zero (no effect on the output).

Several characters share one audio track: character c hears it where it speaks (speaking[c]) and silence
elsewhere, so a listener is fed silence, as `serve` does with `push_silence`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from decoder.checkpoint import load_vae
from decoder.encode import i2v_mask, image_to_tensor
from decoder.vae import WanVAE, build_vae
from frontends.audio_features import AudioFeaturizer, check_matches, featurizer_config_for
from frontends.conditioning import ConditioningConfig, ConditioningEncoders
from proto.chunk_specs import pad_text_context
from proto.model_config import ModelConfig
from proto.vae_config import get_vae_preset
from training.fsdp import world
from training.pools import as_arrays, as_tensors
from workers.audio import AudioConditioning, face_token_mask, normalise_boxes
from workers.model import WanModel

DEFAULT_PROMPT = "a person talking"
"""`talkingmachines run`'s default prompt; training conditions on the same text."""

VAE_TEMPORAL_STRIDE = 4
PATCH = 2


class ClipLike(Protocol):
    """The fields of training.data.Clip that batching reads."""

    video: np.ndarray
    audio: np.ndarray
    speaking: np.ndarray
    face_boxes_px: np.ndarray
    mouth_boxes_px: np.ndarray
    reference: np.ndarray
    num_characters: int


@dataclass
class ModelInputs:
    """A batch of B encoded clips of K chunks of F latent frames (L = K·F), C characters, S tokens per frame.

    latents: `[B, 16, L, h, w]` normalised VAE latents (x0 of flow matching).
    y: `[B, 20, L, h, w]` I2V conditioning.
    context: `[B, text_len, text_dim]` umT5 features (zero-padded).
    clip_fea: `[B, clip_tokens, clip_dim]` CLIP features of the reference image.
    audio_span: `[B, C, K, F + W − 1, P, layers, dim]` each chunk's audio window span.
    speaking: `[B, C, K, F]` bool per latent frame.
    face_mask: `[B, C, L·S]` float in {0, 1}.
    mouth: `[B, L, h, w]` float in {0, 1}: latent cells that any character's mouth box touches in the video
        frames of that latent frame (the region the lip-sync signal lives in; losses may weigh it up).
    """

    latents: torch.Tensor
    y: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor
    audio_span: torch.Tensor
    speaking: torch.Tensor
    face_mask: torch.Tensor
    mouth: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.audio_span.shape[2]

    @property
    def chunk_latents(self) -> int:
        return self.latents.shape[2] // self.num_chunks

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> ModelInputs:
        """The clips at `index` (along the batch)."""
        if not isinstance(index, slice | torch.Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        return ModelInputs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state(self) -> dict[str, torch.Tensor]:
        """Plain dict for torch.save."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ModelInputs:
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def collate(items: Sequence[ModelInputs]) -> ModelInputs:
    """Concatenate batches along B (same K, resolution and character count)."""
    if not items:
        raise ValueError("collate needs at least one ModelInputs")
    return ModelInputs(
        **{f.name: torch.cat([getattr(i, f.name) for i in items]) for f in fields(ModelInputs)}
    )


class ClipEncoder:
    """Holds the front-ends (VAE, tiny umT5/CLIP, wav2vec2 config) and encodes clips into `ModelInputs`.

    The umT5/CLIP/wav2vec2 are the seeded tiny random ones of `talkingmachines run --seed seed`; the prompt
    is encoded once. The VAE may sit on an accelerator (pixels go there and latents come back to the CPU);
    the other front-ends run on the CPU. vae None: an encoder of the per-clip conditioning only (data
    workers, `encode_rest`).
    """

    def __init__(
        self,
        model: ModelConfig,
        vae: WanVAE | None,
        *,
        chunk_latents: int = 3,
        max_characters: int = 2,
        seed: int = 0,
        prompt: str = DEFAULT_PROMPT,
    ) -> None:
        if model.audio is None or not model.has_image_branch:
            raise ValueError(f"training needs an i2v preset with audio layers; {model.name!r} is not one")
        self.model = model
        self.vae = vae.eval() if vae is not None else None
        self.chunk_latents = chunk_latents
        self.max_characters = max_characters
        self.seed = seed
        self.encoders = ConditioningEncoders.from_config(ConditioningConfig.for_model(model, tiny_seed=seed))
        self.context = pad_text_context(self.encoders.encode_prompt(prompt), model)
        self.featurizer_config = featurizer_config_for(
            model.audio, fps=16, chunk_latents=chunk_latents, tiny_seed=seed
        )
        self._featurizer_model = AudioFeaturizer(self.featurizer_config).model
        check_matches(AudioFeaturizer(self.featurizer_config, self._featurizer_model), model.audio)

    def _chunk_audio(self, pcm: np.ndarray, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One character's audio `[N]` → spans `[K, F + W − 1, P, layers, dim]`, speaking `[K, F]`."""
        featurizer = AudioFeaturizer(self.featurizer_config, self._featurizer_model)
        featurizer.push(pcm.astype(np.float32))
        featurizer.end_of_stream()
        spans, speaking = [], []
        for chunk in range(num_chunks):
            audio = featurizer.features_for_chunk(chunk)
            spans.append(audio.span)
            speaking.append(audio.speaking_latent)
        return torch.stack(spans), torch.stack(speaking)

    def _layout(self, clip: ClipLike) -> int:
        """Chunks in the clip (checked)."""
        frames = clip.video.shape[0]
        if (frames - 1) % VAE_TEMPORAL_STRIDE:
            raise ValueError(f"clip has {frames} frames; the VAE needs 1 + 4k")
        num_chunks = (1 + (frames - 1) // VAE_TEMPORAL_STRIDE) // self.chunk_latents
        if num_chunks < 2:
            raise ValueError(
                f"clip of {frames} frames holds fewer than 2 chunks of {self.chunk_latents} latents "
                f"(needs ≥ {1 + VAE_TEMPORAL_STRIDE * (2 * self.chunk_latents - 1)} frames)"
            )
        if int(clip.num_characters) > self.max_characters:
            raise ValueError(
                f"clip has {clip.num_characters} characters, max_characters={self.max_characters}; raise it"
            )
        return num_chunks

    @torch.no_grad()
    def _encode_pixels(
        self, clips: Sequence[ClipLike], latent_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched VAE work: latents `[B, 16, L, h, w]` of the videos and y `[B, 20, L, h, w]`.

        y is what `decoder.encode.I2VConditioning` computes (mask, then the latents of [image, gray, …]
        through one causal cache, 4 frames a step), here for a batch of reference images at once.
        """
        if self.vae is None:
            raise ValueError("this ClipEncoder was built without a VAE (conditioning only)")
        device = self.vae.conv2.weight.device
        video = torch.stack([torch.from_numpy(np.ascontiguousarray(c.video)) for c in clips])
        video = video.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
        latents = self.vae.encode(video.to(device))[:, :, :latent_frames].float().cpu()
        images = torch.stack([image_to_tensor(c.reference) for c in clips])
        gray_frames = 1 + VAE_TEMPORAL_STRIDE * (latent_frames - 1)
        gray = torch.zeros(len(clips), 3, gray_frames, *images.shape[2:])
        gray[:, :, 0] = images
        image_latents = self.vae.encode(gray.to(device), frames_per_step=VAE_TEMPORAL_STRIDE).float().cpu()
        mask = i2v_mask(latent_frames, *image_latents.shape[3:])
        y = torch.cat([mask.expand(len(clips), *mask.shape), image_latents], dim=1)
        return latents, y

    def encode_rest(self, clip: ClipLike) -> dict[str, torch.Tensor]:
        """The per-clip conditioning of `encode_many` (no VAE work): what a data worker computes."""
        return self._encode_rest(clip, self._layout(clip))

    @torch.no_grad()
    def _encode_rest(self, clip: ClipLike, num_chunks: int) -> dict[str, torch.Tensor]:
        """Per-clip conditioning: CLIP features, per-character audio spans/flags and face masks."""
        c = int(clip.num_characters)
        latent_frames = num_chunks * self.chunk_latents
        _, height, width, _ = clip.video.shape
        spans, speaking = [], []
        samples_per_frame = self.featurizer_config.samples_per_frame
        for j in range(c):
            pcm = np.asarray(clip.audio, dtype=np.float32)
            if c > 1:
                talk = np.repeat(np.asarray(clip.speaking[j], dtype=np.float32), samples_per_frame)
                pcm = pcm[: talk.size] * talk[: pcm.size]
            span, talking = self._chunk_audio(pcm, num_chunks)
            spans.append(span)
            speaking.append(talking)
        tokens_h, tokens_w = height // 8 // PATCH, width // 8 // PATCH
        if c == 1:
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
        else:
            pixel_boxes = torch.as_tensor(np.asarray(clip.face_boxes_px))
            boxes = normalise_boxes(pixel_boxes, height, width).clamp(0, 1)
        face_mask = face_token_mask(boxes, tokens_h, tokens_w, latent_frames).float()
        for _ in range(c, self.max_characters):
            spans.append(torch.zeros_like(spans[0]))
            speaking.append(torch.zeros_like(speaking[0]))
            face_mask = torch.cat([face_mask, torch.zeros_like(face_mask[:1])])
        return {
            "clip_fea": self.encoders.encode_image(np.ascontiguousarray(clip.reference)),
            "audio_span": torch.stack(spans),
            "speaking": torch.stack(speaking),
            "face_mask": face_mask,
        }

    def encode_many(
        self,
        clips: Sequence[ClipLike],
        vae_batch: int = 16,
        progress: bool = False,
        rest: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> ModelInputs:
        """Clips (same size and length) → `ModelInputs`, B = len(clips); VAE batches of `vae_batch`
        (`progress`: a progress bar per clip). rest: the clips' `encode_rest`, when already computed."""
        if not clips:
            raise ValueError("encode_many needs at least one clip")
        num_chunks = self._layout(clips[0])
        if any(self._layout(c) != num_chunks or c.video.shape != clips[0].video.shape for c in clips):
            raise ValueError("all clips of a batch need the same frame count and size")
        latent_frames = num_chunks * self.chunk_latents
        starts = range(0, len(clips), vae_batch)
        if rest is not None and len(rest) != len(clips):
            raise ValueError(f"encode_many got {len(rest)} conditioning entries for {len(clips)} clips")
        total = len(clips) * (1 if rest is not None else 2)
        bar = tqdm(total=total, desc="encode clips", unit="step", disable=not progress, leave=False)
        parts = []
        for i in starts:
            parts.append(self._encode_pixels(clips[i : i + vae_batch], latent_frames))
            bar.update(len(clips[i : i + vae_batch]))
        if rest is None:
            rest = []
            for c in clips:
                rest.append(self._encode_rest(c, num_chunks))
                bar.update()
        bar.close()
        return ModelInputs(
            latents=torch.cat([p[0] for p in parts]),
            y=torch.cat([p[1] for p in parts]),
            context=self.context[None].expand(len(clips), *self.context.shape).clone(),
            clip_fea=torch.stack([r["clip_fea"] for r in rest]),
            audio_span=torch.stack([r["audio_span"] for r in rest]),
            speaking=torch.stack([r["speaking"] for r in rest]),
            face_mask=torch.stack([r["face_mask"] for r in rest]),
            mouth=torch.stack([mouth_cells(c, latent_frames) for c in clips]),
        )


def mouth_cells(clip: ClipLike, latent_frames: int, stride: int = 8) -> torch.Tensor:
    """`[L, H/stride, W/stride]` 1.0 where a latent cell overlaps any character's mouth box in any video
    frame of that latent frame (latent 0 is frame 0; latent k ≥ 1 covers frames 4k − 3 … 4k), else 0."""
    _, height, width, _ = clip.video.shape
    h, w = height // stride, width // stride
    boxes = np.asarray(clip.mouth_boxes_px, dtype=np.float32)  # [C, T, 4]
    cell_lo_x = np.arange(w, dtype=np.float32) * stride
    cell_lo_y = np.arange(h, dtype=np.float32) * stride
    out = np.zeros((latent_frames, h, w), np.float32)
    for k in range(latent_frames):
        frames = [0] if k == 0 else range(VAE_TEMPORAL_STRIDE * k - 3, VAE_TEMPORAL_STRIDE * k + 1)
        for box in boxes[:, list(frames)].reshape(-1, 4):
            in_x = (cell_lo_x + stride > box[0]) & (cell_lo_x < box[2])
            in_y = (cell_lo_y + stride > box[1]) & (cell_lo_y < box[3])
            out[k] = np.maximum(out[k], (in_y[:, None] & in_x[None, :]).astype(np.float32))
    return torch.from_numpy(out)


def token_weight(inputs: ModelInputs, mouth_weight: float) -> torch.Tensor:
    """Per-element loss weights `[B, 1, L, h, w]`: 1 + mouth_weight in mouth cells, 1 elsewhere."""
    return (1.0 + mouth_weight * inputs.mouth)[:, None]


def load_or_build_vae(checkpoint: str | None, preset: str, seed: int = 0) -> WanVAE:
    """Stage A's VAE from `checkpoint`, or (None) the seeded random one `talkingmachines run` builds."""
    cfg = get_vae_preset(preset)
    if checkpoint is not None:
        return load_vae(checkpoint, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vae(cfg)


def vae_identity(checkpoint: str | None, seed: int = 0) -> str:
    """What names a VAE in an encoded-clip cache's key: its checkpoint's content (SHA-256), not its path, so
    a run directory copied or moved elsewhere keeps its encoded clips; the seeded random VAE by its seed."""
    if checkpoint is None:
        return f"seeded:{seed}"
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


_WORKER_STATE: dict[str, Any] = {}


def _worker_init(
    dataset: Any, model: ModelConfig, chunk_latents: int, max_characters: int, seed: int
) -> None:
    torch.set_num_threads(1)
    _WORKER_STATE["dataset"] = dataset
    _WORKER_STATE["encoder"] = ClipEncoder(
        model, None, chunk_latents=chunk_latents, max_characters=max_characters, seed=seed
    )


def _worker_clip(index: int) -> tuple[Any, dict[str, np.ndarray]]:
    clip = _WORKER_STATE["dataset"].clip(index)
    return clip, as_arrays(_WORKER_STATE["encoder"].encode_rest(clip))


def draw_in_workers(
    dataset: Any, indices: Sequence[int], encoder: ClipEncoder, workers: int, desc: str = "draw clips",
    show: bool = True,
) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
    """`dataset.clip(i)` and its `encoder.encode_rest` for every i, in `workers` spawned processes (the
    rendering, espeak-ng and wav2vec2 work is per clip and CPU-bound; the VAE work stays with the caller).
    The same values as drawing in this process: each clip is a pure function of (seed, index)."""
    import multiprocessing

    init = (dataset, encoder.model, encoder.chunk_latents, encoder.max_characters, encoder.seed)
    ctx = multiprocessing.get_context("spawn")  # the parent may already hold a CUDA context
    clips, rest = [], []
    with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:
        results = pool.imap(_worker_clip, list(indices), chunksize=4)
        for clip, conditioning in tqdm(results, total=len(indices), desc=desc, disable=not show, leave=False):
            clips.append(clip)
            rest.append(as_tensors(conditioning))
    return clips, rest


def encode_dataset(
    dataset: Any,
    indices: Sequence[int],
    encoder: ClipEncoder,
    cache: Path | None = None,
    key: str = "",
    workers: int = 0,
    vae_batch: int = 16,
    conditioning_key: str | None = None,
) -> ModelInputs:
    """Encode `dataset.clip(i)` for every i once; with `cache`, reuse the file when it was written for the
    same indices and `key` (a description of the data config, VAE checkpoint and preset); of a cache with the
    same key but other indices, the clips it holds are reused and only the others encoded. workers > 0
    draws the clips and their conditioning in that many processes (`draw_in_workers`); vae_batch: clips per
    VAE call.

    conditioning_key: the part of `key` that is not the VAE (data, seed, model, audio front-end). Of a cache
    with the same conditioning_key but another VAE, the clips asked for keep their CLIP, audio, face and
    mouth inputs and have only their latents encoded again (`reencode_pixels`; the cache is rewritten with
    them alone): a new VAE costs the VAE work, not the wav2vec2 and espeak-ng work per clip again.
    """
    indices = list(indices)
    cached: ModelInputs | None = None
    have: dict[int, int] = {}
    rewrite = False  # the cache's pixels were encoded again: write it back even with no clip missing
    show_all = world()[0] == 0
    if cache is not None and cache.is_file():
        state = torch.load(cache, weights_only=True)
        if state.get("key") == key and "mouth" in state:
            if state.get("indices") == indices:
                return ModelInputs.from_state(state)
            cached = ModelInputs.from_state(state)
            have = {int(i): n for n, i in enumerate(state.get("indices", []))}
        elif (
            conditioning_key is not None and "mouth" in state
            and cache_conditioning_key(state) == conditioning_key
        ):
            held = {int(i): n for n, i in enumerate(state.get("indices", []))}
            keep = [i for i in indices if i in held]  # only the clips asked for are encoded again
            if show_all:
                print(f"note: {cache} was encoded with another VAE; encoding {len(keep)} of its clips' "
                      "latents again (keeping their audio, image and face inputs)",
                      file=sys.stderr)  # fmt: skip
            old = ModelInputs.from_state(state).select([held[i] for i in keep])
            cached = reencode_pixels(old, dataset, keep, encoder, vae_batch, show_all)
            have = {i: n for n, i in enumerate(keep)}
            rewrite = True
        elif show_all:
            print(f"note: {cache} was encoded for other data, another VAE or model, or by an older version; "
                  "encoding again", file=sys.stderr)  # fmt: skip
    missing = [i for i in indices if i not in have]  # a grown data set encodes only its new clips
    show = show_all and len(missing) > 1
    name = cache.name if cache is not None else "clips"
    inputs = None
    if missing and workers > 0:
        clips, rest = draw_in_workers(dataset, missing, encoder, workers, f"draw {name}", show)
        inputs = encoder.encode_many(clips, vae_batch=vae_batch, progress=show, rest=rest)
    elif missing:
        clips = [dataset.clip(i) for i in tqdm(missing, desc=f"draw {name}", disable=not show, leave=False)]
        inputs = encoder.encode_many(clips, vae_batch=vae_batch, progress=show)
    if cached is not None and len(missing) < len(indices):
        new_at = {i: len(have) + n for n, i in enumerate(missing)}
        pool = cached if inputs is None else collate([cached, inputs])
        inputs = pool.select([have[i] if i in have else new_at[i] for i in indices])
    if inputs is None and cached is not None:  # pixels encoded again, every clip asked for was cached
        inputs = cached.select([have[i] for i in indices])
    assert inputs is not None
    extra = {} if conditioning_key is None else {"conditioning_key": conditioning_key}
    if cache is not None and world()[0] == 0 and missing:  # (a subset of a cache leaves the file as it is)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**inputs.state(), "indices": indices, "key": key, **extra}, cache)
    elif cache is not None and world()[0] == 0 and rewrite:  # the re-encoded clips (those asked for)
        assert cached is not None
        torch.save({**cached.state(), "indices": list(have), "key": key, **extra}, cache)
    return inputs


def cache_conditioning_key(state: Mapping[str, Any]) -> str | None:
    """The conditioning key an encoded-clip cache was written with; for a cache from before it was stored,
    its key (``data|seed=…|vae=…|model|front-end``) without the VAE part."""
    if "conditioning_key" in state:
        return str(state["conditioning_key"])
    key = str(state.get("key", ""))
    head, sep, rest = key.partition("|vae=")
    if not sep or "|" not in rest:
        return None
    return head + "|" + rest.split("|", 1)[1]


@torch.no_grad()
def reencode_pixels(
    inputs: ModelInputs,
    dataset: Any,
    indices: Sequence[int],
    encoder: ClipEncoder,
    vae_batch: int = 16,
    progress: bool = False,
) -> ModelInputs:
    """`inputs` (clips `indices` of `dataset`) with latents and y encoded again by `encoder`'s VAE; every
    other field kept. The clips are drawn again, `vae_batch` at a time (a pure function of seed and index)."""
    if len(indices) != inputs.batch_size:
        raise ValueError(f"{len(indices)} indices for {inputs.batch_size} encoded clips")
    latent_frames = inputs.latents.shape[2]
    latents, ys = [], []
    bar = tqdm(
        total=len(indices), desc="encode latents again", unit="clip", disable=not progress, leave=False
    )
    for start in range(0, len(indices), vae_batch):
        clips = [dataset.clip(i) for i in indices[start : start + vae_batch]]
        z, y = encoder._encode_pixels(clips, latent_frames)
        latents.append(z)
        ys.append(y)
        bar.update(len(clips))
    bar.close()
    return replace(inputs, latents=torch.cat(latents), y=torch.cat(ys))


@dataclass
class ChunkedAudio:
    """Whole-clip audio as chunks: span `[B, C, K, F + W − 1, P, layers, dim]`, speaking `[B, C, K, F]`,
    face_mask `[B, C, L·S]` (see `ModelInputs`)."""

    span: torch.Tensor
    speaking: torch.Tensor
    face_mask: torch.Tensor


class _BlockContextKV(Mapping[str, torch.Tensor]):
    """One block's text/image cross-attention keys/values, computed when the block reads them.

    Under FSDP a block's parameters are gathered only inside its own forward; WanModel computes every block's
    context K/V up front in the root forward, which would read sharded parameters. Computing them on access
    moves that work inside the block's forward (and into its activation-checkpointed recomputation). Each
    access recomputes the small context projection, so no tensor outlives the forward that made it.
    """

    def __init__(self, cross_attn: nn.Module, text: torch.Tensor, image: torch.Tensor | None) -> None:
        self.cross_attn = cross_attn
        self.text = text
        self.image = image
        self._keys = ("k", "v", "k_img", "v_img") if image is not None else ("k", "v")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.cross_attn.context_kv(self.text, self.image)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ChunkAudioWanModel(WanModel):
    """`WanModel` (same parameters and names, so Wan-layout state dicts load and save unchanged) for training.

    Its forward also takes `chunked_audio`: the audio tokens are projected chunk by chunk, as a stream does,
    inside the forward (so FSDP's root forward gathers `audio_proj` like every other root parameter); and
    the per-block text/image K/V are computed inside each block (`_BlockContextKV`). The computation is
    WanModel's, operation for operation.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, t: torch.Tensor, *, chunked_audio: ChunkedAudio | None = None, **kwargs: Any
    ) -> torch.Tensor:
        if chunked_audio is not None:
            if kwargs.get("audio") is not None:
                raise ValueError("pass either audio or chunked_audio, not both")
            tokens = project_chunked_audio(self, chunked_audio.span, chunked_audio.speaking)
            kwargs["audio"] = AudioConditioning(tokens=tokens, face_mask=chunked_audio.face_mask)
        if kwargs.get("cross_kv") is None and kwargs.get("context") is not None:
            text = self.embed_text(kwargs.pop("context"))
            clip_fea = kwargs.pop("clip_fea", None)
            image = None
            if self.config.has_image_branch and clip_fea is not None:
                image = self.img_emb(clip_fea.to(self.img_emb.proj[1].weight.dtype))
            kwargs["cross_kv"] = [_BlockContextKV(block.cross_attn, text, image) for block in self.blocks]
        return super().forward(x, t, **kwargs)


def as_training_model(model: WanModel) -> ChunkAudioWanModel:
    """A `ChunkAudioWanModel` with `model`'s weights (same device/dtype, same requires_grad, same mode)."""
    param = next(model.parameters())
    with torch.device("meta"):
        out = ChunkAudioWanModel(model.config)
    out.load_state_dict(model.state_dict(), assign=True)
    out.to(param.device)
    return out.train(model.training).requires_grad_(param.requires_grad)


def project_chunked_audio(model: WanModel, span: torch.Tensor, speaking: torch.Tensor) -> torch.Tensor:
    """Project every chunk's audio span as a stream would: span `[B, C, K, F + W − 1, ...]`, speaking
    `[B, C, K, F]` → tokens `[B, C, K·F, num_tokens, token_dim]`."""
    c, k = span.shape[1:3]
    tokens = model.audio_proj(span.flatten(1, 2), speaking.flatten(1, 2))  # [B, C·K, F, N, D]
    return tokens.unflatten(1, (c, k)).flatten(2, 3)


def chunked_audio(inputs: ModelInputs, keep_audio: torch.Tensor | None = None) -> ChunkedAudio:
    """The audio of a full-clip forward. keep_audio `[B]` bool: False drops a clip's audio (its face mask
    becomes zero, which makes the audio branch add exactly nothing: the audio-unconditional model)."""
    face_mask = inputs.face_mask
    if keep_audio is not None:
        face_mask = face_mask * keep_audio.to(face_mask)[:, None, None]
    return ChunkedAudio(span=inputs.audio_span, speaking=inputs.speaking, face_mask=face_mask)

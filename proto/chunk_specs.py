"""The tensors that travel with each runtime message, and the noise every rank derives from a chunk's seed.

One place states the layouts both sides use: the master builds its tensors to these specs and puts them
in the header (``SessionOpen.tensors`` / ``ChunkRequest.tensors`` / ``ChunkResult.tensors``); the workers
check the received header against the same specs (``proto.wire.check_specs``) before using anything.
All float tensors are float32 on the wire; the score model casts them to its own dtype.

SessionOpen (once per session):
- ``context`` ``[text_len, text_dim]``: umT5 features zero-padded to the preset's ``text_len`` rows
  (``pad_text_context``; the DiT pads with zeros itself, so this is exactly the unpadded result);
- ``clip_fea`` ``[clip_tokens, clip_dim]``: CLIP features of the reference image (i2v presets only);
- ``face_boxes`` ``[C, 4]``: per character, the face box (x0, y0, x1, y1) normalised to [0, 1] (presets
  with audio layers only; ``(0, 0, 1, 1)`` = the whole frame).

ChunkRequest (per chunk; ``speaking[c][f]`` and ``noise_seed`` ride in the header). F is the chunk's own
latent frame count, ``StreamConfig.frames_in_chunk(i)`` (LiveAct: 6 for chunk 0, then 8):
- ``y`` ``[20, F, h, w]``: the I2V conditioning of the chunk's latent frames (i2v presets only);
- ``audio``, presets with audio layers only:
  - ``talkingmachines`` variant: ``[C, F + window − 1, frames_per_latent, wav2vec_layers, wav2vec_dim]``,
    per character the wav2vec2 features of the chunk plus ``half_window`` latent frames of context on each
    side;
  - ``infinitetalk`` variant: ``[C, T, audio_window, wav2vec_layers, wav2vec_dim]``, per character and per
    video frame of the chunk (T = ``video_frames_in_chunk(i)``) the window of wav2vec2 hidden states around
    it (``workers.audio.video_frame_windows``).

ChunkResult: ``latent`` ``[16, F, h, w]``, the chunk's clean latent.

Noise: ``chunk_noise(chunk_seed(session_seed, chunk_index), num_steps, latent_shape)`` gives bit-identical
noise on every rank of every topology (CPU generator), so SP and single-worker runs see the same noise.
"""

from __future__ import annotations

import torch

from proto.model_config import AudioConfig, InfiniteTalkAudioConfig, ModelConfig
from proto.stream_config import StreamConfig
from proto.wire import TensorSpec

LATENT_CHANNELS = 16
I2V_CONDITION_CHANNELS = 20

_SEED_MASK = (1 << 63) - 1


def session_open_specs(model: ModelConfig, num_characters: int) -> tuple[TensorSpec, ...]:
    """The tensors of a ``SessionOpen`` for this preset and number of characters, in wire order."""
    if num_characters < 1:
        raise ValueError(f"a session needs at least one character, got num_characters={num_characters}")
    specs = [TensorSpec("context", (model.text_len, model.text_dim), "float32")]
    if model.has_image_branch:
        specs.append(TensorSpec("clip_fea", (model.clip_tokens, model.clip_dim), "float32"))
    if model.audio is not None:
        specs.append(TensorSpec("face_boxes", (num_characters, 4), "float32"))
    return tuple(specs)


def chunk_request_specs(
    model: ModelConfig, stream: StreamConfig, num_characters: int, chunk_index: int = 1
) -> tuple[TensorSpec, ...]:
    """The tensors of chunk ``chunk_index``'s ``ChunkRequest`` for this preset, stream and number of
    characters, in wire order (the default, 1, is any chunk after the first)."""
    f = stream.frames_in_chunk(chunk_index)
    specs = []
    if model.has_image_branch:
        specs.append(
            TensorSpec("y", (I2V_CONDITION_CHANNELS, f, stream.latent_height, stream.latent_width), "float32")
        )
    a = model.audio
    if isinstance(a, AudioConfig):
        shape = (num_characters, f + a.window - 1, a.frames_per_latent, a.wav2vec_layers, a.wav2vec_dim)
        specs.append(TensorSpec("audio", shape, "float32"))
    elif isinstance(a, InfiniteTalkAudioConfig):
        frames = stream.video_frames_in_chunk(chunk_index)
        shape = (num_characters, frames, a.audio_window, a.wav2vec_layers, a.wav2vec_dim)
        specs.append(TensorSpec("audio", shape, "float32"))
    return tuple(specs)


def chunk_result_specs(stream: StreamConfig, chunk_index: int = 1) -> tuple[TensorSpec, ...]:
    """The tensors of chunk ``chunk_index``'s ``ChunkResult``: the clean latent ``[16, F, h, w]`` float32."""
    return (TensorSpec("latent", stream.latent_shape(chunk_index), "float32"),)


def pad_text_context(context: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """umT5 features ``[Lt ≤ text_len, text_dim]`` → zero-padded float32 ``[text_len, text_dim]``."""
    if context.ndim != 2 or context.shape[1] != model.text_dim or context.shape[0] > model.text_len:
        raise ValueError(
            f"text context has shape {tuple(context.shape)}; preset {model.name!r} takes "
            f"[≤{model.text_len}, {model.text_dim}]"
        )
    padded = context.new_zeros(model.text_len, model.text_dim, dtype=torch.float32)
    padded[: context.shape[0]] = context
    return padded


def chunk_seed(session_seed: int, chunk_index: int) -> int:
    """The noise seed of chunk ``chunk_index`` of a session seeded with ``session_seed``, in [0, 2^63).

    A SplitMix64 finaliser over (session seed, chunk index), so neighbouring chunks and sessions get
    unrelated seeds.
    """
    if chunk_index < 0:
        raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
    z = (session_seed * 0x9E3779B97F4A7C15 + (chunk_index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _SEED_MASK


def chunk_noise(seed: int, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Noise ``[num_steps, *latent_shape]`` float32 on the CPU from ``torch.Generator().manual_seed(seed)``.

    ``[0]`` is the chunk's initial x_T, ``[s]`` the fresh noise that re-noises to step s (the layout of
    ``StreamingDiT.denoise_chunk(noise=…)``). Move it to the device after drawing, never draw it there:
    CPU generation is what makes it identical on every rank and machine.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((num_steps, *latent_shape), generator=generator, dtype=torch.float32)

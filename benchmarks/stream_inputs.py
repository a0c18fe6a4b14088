"""Synthetic inputs for the pipeline benchmarks: a random portrait and a speech-like clip of an exact length.

The clip length is chosen so that ``talkingmachines run`` streams exactly ``chunks`` chunks: chunk 0 decodes
to ``1 + 4·(F − 1)`` video frames and every later chunk to ``4·F`` (``proto.stream_config``), so ``K`` chunks
cover ``4·F·K − 3`` frames, and the master streams the smallest chunk count whose frames reach the audio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from proto.stream_config import VAE_STRIDE

SAMPLE_RATE = 16_000


def frames_for_chunks(chunks: int, chunk_latent_frames: int) -> int:
    """Video frames of ``chunks`` chunks of ``chunk_latent_frames`` latent frames: ``4·F·K − 3``."""
    if chunks < 1 or chunk_latent_frames < 1:
        raise ValueError(f"chunks ({chunks}) and chunk_latent_frames ({chunk_latent_frames}) must be >= 1")
    return VAE_STRIDE[0] * chunk_latent_frames * chunks - (VAE_STRIDE[0] - 1)


def audio_samples_for_chunks(chunks: int, chunk_latent_frames: int, fps: int = 16) -> int:
    """16 kHz samples whose video (``ceil(samples · fps / 16000)`` frames) needs exactly ``chunks`` chunks."""
    if SAMPLE_RATE % fps:
        raise ValueError(f"fps {fps} must divide the {SAMPLE_RATE} Hz sample rate")
    return frames_for_chunks(chunks, chunk_latent_frames) * (SAMPLE_RATE // fps)


def write_inputs(
    folder: Path, audio_samples: int, image_size: tuple[int, int] = (96, 80)
) -> tuple[Path, Path]:
    """Write ``face.png`` (random RGB, ``image_size`` = (height, width)) and ``speech.wav`` into ``folder``.

    The audio is a 220 Hz tone gated on and off at 1.5 Hz (float32, 16 kHz mono, ``audio_samples`` long),
    so the speaking flags change from chunk to chunk as they would with speech. Deterministic.
    """
    rng = np.random.default_rng(0)
    image = folder / "face.png"
    Image.fromarray((rng.random((*image_size, 3)) * 255).astype(np.uint8)).save(image)
    t = np.arange(audio_samples) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)
    audio = folder / "speech.wav"
    sf.write(audio, tone.astype(np.float32), SAMPLE_RATE)
    return image, audio

"""Regenerate the example inputs shipped in examples/ (run from the repository root):

    python -m examples.make_examples

- portrait.png: a 512x512 drawn cartoon face (deterministic, Pillow).
- speech.wav: about 4 s of English speech, 16 kHz mono PCM16, synthesised with espeak-ng
  (`apt-get install espeak-ng`); without it, a syllable-like synthetic voice (harmonics of a gliding
  pitch through vowel formants, 4 syllables per second) so the example still has speech-like rhythm.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter

from frontends.audio_io import TARGET_SAMPLE_RATE, load_audio

HERE = Path(__file__).resolve().parent
SENTENCE = "Hello! I am a talking machine, and I turn your voice into a moving face."


def make_portrait(size: int = 512) -> Image.Image:
    """A front-facing cartoon head and shoulders on a soft background."""
    image = Image.new("RGB", (size, size), (200, 215, 230))
    draw = ImageDraw.Draw(image)
    s = size / 512
    for y in range(size):  # vertical background gradient
        shade = int(230 - 50 * y / size)
        draw.line([(0, y), (size, y)], fill=(shade - 30, shade - 15, shade))

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    draw.ellipse(box(96, 400, 416, 640), fill=(60, 90, 140))  # shoulders
    draw.rectangle(box(220, 330, 292, 420), fill=(225, 180, 150))  # neck
    draw.ellipse(box(136, 70, 376, 370), fill=(235, 192, 160))  # face
    draw.chord(box(126, 52, 386, 250), 180, 360, fill=(70, 45, 30))  # hair
    draw.ellipse(box(124, 200, 150, 260), fill=(225, 180, 150))  # ears
    draw.ellipse(box(362, 200, 388, 260), fill=(225, 180, 150))
    for cx in (205, 307):  # eyes and brows
        draw.ellipse(box(cx - 24, 196, cx + 24, 224), fill=(255, 255, 255))
        draw.ellipse(box(cx - 10, 200, cx + 10, 220), fill=(60, 40, 25))
        draw.ellipse(box(cx - 4, 204, cx + 2, 210), fill=(255, 255, 255))
        draw.line(box(cx - 26, 182, cx + 24, 176), fill=(70, 45, 30), width=max(1, int(6 * s)))
    draw.line(box(256, 225, 248, 275), fill=(200, 150, 120), width=max(1, int(4 * s)))  # nose
    draw.line(box(248, 275, 262, 278), fill=(200, 150, 120), width=max(1, int(4 * s)))
    draw.chord(box(216, 295, 296, 335), 0, 180, fill=(170, 70, 70))  # mouth
    draw.ellipse(box(165, 255, 200, 280), fill=(240, 170, 160))  # cheeks
    draw.ellipse(box(312, 255, 347, 280), fill=(240, 170, 160))
    return image.filter(ImageFilter.SMOOTH)


def synth_speech_espeak(text: str) -> np.ndarray | None:
    """espeak-ng speech resampled to 16 kHz mono float32, or None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "165", "-w", str(wav), text], check=True)
        return load_audio(wav)


def synth_speech_fallback(seconds: float = 4.0) -> np.ndarray:
    """A syllable-like voice: harmonics of a gliding 110-150 Hz pitch, weighted by two vowel formants that
    change every syllable, under a 4 Hz on/off envelope. `[N]` float32 at 16 kHz."""
    rate = TARGET_SAMPLE_RATE
    t = np.arange(int(seconds * rate)) / rate
    f0 = 130 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    vowels = [(730, 1090), (270, 2290), (570, 840), (530, 1840), (300, 870)]  # a, i, o, e, u
    syllable = (t * 4).astype(int)
    f1 = np.array([vowels[k % len(vowels)][0] for k in syllable])
    f2 = np.array([vowels[k % len(vowels)][1] for k in syllable])
    voice = np.zeros_like(t)
    for h in range(1, 40):
        freq = h * f0
        gain = np.exp(-(((freq - f1) / 120) ** 2)) + 0.5 * np.exp(-(((freq - f2) / 150) ** 2)) + 0.02 / h
        voice += gain * np.sin(h * phase)
    envelope = np.clip(np.sin(np.pi * (t * 4 % 1)) * 1.4, 0, 1) * (t < seconds - 0.4)
    voice *= envelope
    return (0.5 * voice / np.abs(voice).max()).astype(np.float32)


def main() -> None:
    make_portrait().save(HERE / "portrait.png", optimize=True)
    speech = synth_speech_espeak(SENTENCE)
    if speech is None:
        print("espeak-ng not found: writing the synthetic syllable voice instead")
        speech = synth_speech_fallback()
    speech = 0.7 * speech / max(float(np.abs(speech).max()), 1e-6)
    sf.write(HERE / "speech.wav", speech, TARGET_SAMPLE_RATE, subtype="PCM_16")
    for name in ("portrait.png", "speech.wav"):
        print(f"{name}: {(HERE / name).stat().st_size / 1024:.1f} KiB")
    print(f"speech.wav: {speech.size / TARGET_SAMPLE_RATE:.2f} s")


if __name__ == "__main__":
    main()

"""Synthetic talking-character clips, generated on the fly with numpy (no downloads, deterministic by seed).

A clip is 1-2 drawn 2-D characters (ellipse or rounded faces, three styles: ``realistic`` shading,
``cartoon`` outlines, ``flat`` colours) on a gradient background, with blinks and small head motion. One
character speaks: its mouth opening follows the envelope of the clip's audio (syllable-like bursts of a
harmonic voice at 3-6 syllables/s with pauses, or espeak-ng speech when asked for and installed); any other
character listens with its mouth closed. Some clips are silent throughout (nobody speaks).

Time grid (the same as the server's audio front-end, frontends/audio_features.py): 16 fps video, 16 kHz audio,
video frame ``v`` shows the samples ``[1000 v, 1000 (v + 1))``. Clips have T = 1 + 4k frames (the VAE's
frame count); the default 33 = 1 + 4*8 frames is 9 latent frames, three chunks of 3 (the paper's 81 frames
are 21 latents = 7 chunks of 3, i.e. T = 12n - 3).

Resolution: 64x64 by default. The tiny VAE compresses 8x spatially, so the DiT sees 8x8 latents (16 tokens
per latent frame with 2x2 patches), small enough to train on 2 CPU cores; at 64 px a single face is ~30 px
wide and its mouth opens by up to ~9 px, enough to measure lip-sync on generated frames. At 32 px the mouth
would be 2-4 px, below what an 8x-compressing VAE can keep.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
FPS = 16
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
# The server's speaking flag: a video frame speaks when its audio RMS exceeds this
# (frontends.audio_features.AudioFeaturizerConfig.speaking_rms_threshold).
SPEAKING_RMS_THRESHOLD = 1e-3
STYLES = ("realistic", "cartoon", "flat")
DIT_CLIP_FRAMES = 57
"""Clip length the teacher and student train on: 15 latent frames, i.e. 5 chunks of 3 (the default student)
or 2 chunks of 7 (Table 1's larger chunk). The VAE trains on 73-frame streams (training.vae_stage)."""
DIT_ESPEAK_FRACTION = 0.5
"""Share of the DiT's speaking clips voiced by espeak-ng (when installed): real speech, so the mouth learns
to follow words and not only the numpy voice's syllables."""


def dit_data_config() -> DataConfig:
    """The teacher's and student's default data: DIT_CLIP_FRAMES-frame clips, DIT_ESPEAK_FRACTION of them
    espeak-ng speech when espeak-ng is on PATH (else all numpy voice: espeak_fraction 0)."""
    espeak = shutil.which("espeak-ng") is not None
    return DataConfig(num_frames=DIT_CLIP_FRAMES, espeak_fraction=DIT_ESPEAK_FRACTION if espeak else 0.0)

# Vowel formants (F1, F2) in Hz: a, i, o, e, u.
_VOWELS = np.array([(730, 1090), (270, 2290), (570, 840), (530, 1840), (300, 870)], dtype=np.float32)
_WORDS = (
    "hello world talking machine voice face moving picture real time stream listen speak video audio "
    "morning evening question answer simple model small chunk frame sound music paper table river"
).split()

# Face-local geometry (units of the face radii rx, ry; y grows downwards).
_MOUTH_Y = 0.5
_MOUTH_MAX_HALF_HEIGHT = 0.25  # half-height of the fully open mouth
_MOUTH_MIN_HALF_HEIGHT = 0.035  # a closed mouth is a thin dark line
_EYE_X, _EYE_Y = 0.38, -0.12
_BLUSH = np.array([0.95, 0.45, 0.45], np.float32)


@dataclass(frozen=True)
class DataConfig:
    """Synthetic data settings.

    Attributes:
        height, width: frame size in pixels (multiples of 8, the tiny VAE's spatial stride).
        num_frames: frames per clip, 1 + 4k (the VAE's temporal layout).
        two_character_prob: probability that a clip has two characters (one speaks, one listens).
        silent_prob: probability that nobody speaks in a clip (zero audio, all mouths closed).
        espeak_fraction: fraction of speaking clips voiced by espeak-ng instead of the numpy voice
            (0 keeps data generation pure numpy and identical on every machine).
        styles: drawing styles to pick from.
    """

    height: int = 64
    width: int = 64
    num_frames: int = 33
    two_character_prob: float = 0.25
    silent_prob: float = 0.1
    espeak_fraction: float = 0.0
    styles: tuple[str, ...] = STYLES

    def __post_init__(self) -> None:
        if self.height < 32 or self.width < 32 or self.height % 8 or self.width % 8:
            raise ValueError(
                f"DataConfig: frame size {self.height}x{self.width} must be multiples of 8 (the VAE's "
                "spatial stride) and at least 32 px so a mouth is visible"
            )
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(
                f"DataConfig: num_frames={self.num_frames} must be 1 + 4k (the VAE's frame layout), e.g. 33"
            )
        for name in ("two_character_prob", "silent_prob", "espeak_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DataConfig: {name}={value} must be a probability in [0, 1]")
        unknown = [s for s in self.styles if s not in STYLES]
        if not self.styles or unknown:
            raise ValueError(f"DataConfig: styles {self.styles} must be a non-empty subset of {STYLES}")
        if self.espeak_fraction > 0 and shutil.which("espeak-ng") is None:
            raise ValueError(
                f"DataConfig: espeak_fraction={self.espeak_fraction} needs espeak-ng on PATH "
                "(apt-get install espeak-ng), or set espeak_fraction=0 for the numpy voice"
            )


@dataclass(frozen=True)
class Clip:
    """One synthetic clip with its ground truth.

    Attributes:
        video: uint8 [T, H, W, 3].
        audio: float32 [T * 1000] 16 kHz mono (silence is exact zeros).
        mouth_open: float32 [C, T] mouth opening per character and frame in [0, 1] (0 = closed).
        envelope: float32 [T] audio envelope per video frame (frame RMS / clip peak RMS) in [0, 1].
        speaking: bool [C, T] the character speaks in that frame (its audio's frame RMS > 1e-3).
        face_boxes_px: float32 [C, 4] (x0, y0, x1, y1) pixels enclosing each head over the whole clip.
        mouth_boxes_px: float32 [C, T, 4] (x0, y0, x1, y1) pixels of the fully open mouth, per frame.
        reference: uint8 [H, W, 3], the first frame (the I2V reference image).
        num_characters: C.
        style: drawing style.
        speaker: index of the speaking character, or -1 when nobody speaks.
        voice: "numpy", "espeak" or "silent".
    """

    video: np.ndarray
    audio: np.ndarray
    mouth_open: np.ndarray
    envelope: np.ndarray
    speaking: np.ndarray
    face_boxes_px: np.ndarray
    mouth_boxes_px: np.ndarray
    reference: np.ndarray
    num_characters: int
    style: str
    speaker: int
    voice: str


class SyntheticTalkingDataset:
    """Clips generated on demand: ``clip(index)`` is a pure function of (seed, index) and the config."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed

    def clip(self, index: int, mouth_open_override: np.ndarray | None = None) -> Clip:
        """The clip number ``index`` (any non-negative int; the data set is unbounded).

        mouth_open_override: float32 [C, T] in [0, 1] draws the same clip (characters, audio, blinks,
        motion) with these mouth openings instead, e.g. a frozen or random mouth for metric baselines.
        """
        if index < 0:
            raise ValueError(f"clip index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        cfg = self.cfg
        t_frames = cfg.num_frames
        n_chars = 2 if rng.random() < cfg.two_character_prob else 1
        style = cfg.styles[int(rng.integers(len(cfg.styles)))]
        silent = rng.random() < cfg.silent_prob
        speaker = -1 if silent else int(rng.integers(n_chars))

        if silent:
            audio = np.zeros(t_frames * SAMPLES_PER_FRAME, np.float32)
            drive = np.zeros(t_frames, np.float32)
            voice = "silent"
        elif rng.random() < cfg.espeak_fraction:
            audio = espeak_audio(rng, t_frames)
            drive = None
            voice = "espeak"
        else:
            audio, drive = synthetic_voice(rng, t_frames)
            voice = "numpy"
        frame_rms = np.sqrt(np.mean(audio.reshape(t_frames, SAMPLES_PER_FRAME).astype(np.float64) ** 2, 1))
        peak = frame_rms.max()
        envelope = (frame_rms / peak if peak > 0 else frame_rms).astype(np.float32)
        if drive is None:  # espeak: the mouth follows the measured envelope
            drive = envelope
        speaking = np.zeros((n_chars, t_frames), bool)
        mouth_open = np.zeros((n_chars, t_frames), np.float32)
        if speaker >= 0:
            speaking[speaker] = frame_rms > SPEAKING_RMS_THRESHOLD
            # A 3-tap symmetric smoothing: lips do not jump between frames, and it adds no delay.
            smooth = np.convolve(np.pad(drive, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
            expressiveness = rng.uniform(0.75, 1.0)
            mouth_open[speaker] = np.clip(smooth * expressiveness, 0.0, 1.0) ** 0.8
        if mouth_open_override is not None:
            if np.shape(mouth_open_override) != mouth_open.shape:
                raise ValueError(
                    f"mouth_open_override must have shape [C, T] = {list(mouth_open.shape)} for clip "
                    f"{index}, got {list(np.shape(mouth_open_override))}"
                )
            mouth_open = np.clip(np.asarray(mouth_open_override, np.float32), 0.0, 1.0)

        characters = [_sample_character(rng, cfg, c, n_chars, style) for c in range(n_chars)]
        video, face_boxes, mouth_boxes = render_clip(rng, cfg, characters, mouth_open, style)
        return Clip(
            video=video,
            audio=audio,
            mouth_open=mouth_open,
            envelope=envelope,
            speaking=speaking,
            face_boxes_px=face_boxes,
            mouth_boxes_px=mouth_boxes,
            reference=video[0].copy(),
            num_characters=n_chars,
            style=style,
            speaker=speaker,
            voice=voice,
        )


# --- audio --------------------------------------------------------------------------------------------


def synthetic_voice(rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A syllable-like voice and its known loudness.

    Syllables of 1/6-1/3 s with random peak loudness; pauses of 0.15-0.5 s between some of them. Each
    syllable is a harmonic series of a gliding pitch weighted by a vowel's two formants, with a short noise
    burst (a consonant) at its onset.

    Returns:
        audio float32 [num_frames * 1000] at 16 kHz, peak 0.3-0.8;
        drive float32 [num_frames] mean syllable envelope per video frame in [0, 1] (what the mouth follows).
    """
    n = num_frames * SAMPLES_PER_FRAME
    duration = n / SAMPLE_RATE
    starts, lengths = [], []
    t = rng.uniform(0.0, min(0.3, duration / 2))  # at least one syllable, even in a 1-frame clip
    while t < duration:
        if rng.random() < 0.2:
            t += rng.uniform(0.15, 0.5)
        length = 1.0 / rng.uniform(3.0, 6.0)
        starts.append(t)
        lengths.append(length)
        t += length
    starts_a = np.array(starts, np.float64)
    lengths_a = np.array(lengths, np.float64)
    amps = rng.uniform(0.5, 1.0, len(starts)).astype(np.float32)
    vowels = _VOWELS[rng.integers(len(_VOWELS), size=len(starts))]

    time = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    idx = np.clip(np.searchsorted(starts_a, time, side="right") - 1, 0, None)
    phase = (time - starts_a[idx]) / lengths_a[idx]
    inside = (phase >= 0) & (phase < 1)
    env = np.where(inside, amps[idx] * np.sin(np.pi * np.clip(phase, 0, 1)) ** 1.5, 0.0).astype(np.float32)

    base_f0 = rng.uniform(95.0, 230.0)
    f0 = base_f0 * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 1.2) * time + rng.uniform(0, 6.3)))
    pitch_phase = (2 * np.pi * np.cumsum(f0) / SAMPLE_RATE).astype(np.float32)
    harmonics = np.arange(1, 21, dtype=np.float32)[:, None]  # [H, 1]
    # Formant gains per syllable at its mean pitch [H, S]; the pitch glides only +-8 %.
    freqs = harmonics * np.float32(base_f0)
    f1, f2 = vowels[:, 0][None, :], vowels[:, 1][None, :]
    gains = np.exp(-(((freqs - f1) / 150.0) ** 2)) + 0.5 * np.exp(-(((freqs - f2) / 200.0) ** 2)) + 0.03
    voice = np.einsum("hn,hn->n", gains[:, idx], np.sin(harmonics * pitch_phase[None, :]))
    onset = np.where(inside & (phase < 0.12), 1.0 - phase / 0.12, 0.0).astype(np.float32)
    noise = rng.standard_normal(n).astype(np.float32) * onset * 0.3 * np.abs(voice).max()
    audio = (voice + noise) * env
    peak = np.abs(audio).max()
    audio = audio / peak * rng.uniform(0.3, 0.8) if peak > 0 else audio
    drive = env.reshape(num_frames, SAMPLES_PER_FRAME).mean(axis=1)
    return audio.astype(np.float32), drive.astype(np.float32)


def espeak_audio(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """espeak-ng speech of a few random words, 16 kHz float32 [num_frames * 1000] (zeros around it)."""
    from frontends.audio_io import resample  # torch-based; only imported on this opt-in path

    n = num_frames * SAMPLES_PER_FRAME
    words = " ".join(_WORDS[int(i)] for i in rng.integers(len(_WORDS), size=max(2, num_frames // 6)))
    cmd = [
        "espeak-ng", "-v", "en-us", "-s", str(int(rng.uniform(140, 190))),
        "-p", str(int(rng.uniform(20, 80))), "--stdout", words,
    ]  # fmt: skip
    import soundfile

    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    speech = resample(samples if samples.ndim == 1 else samples.mean(1), rate, SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    start = int(rng.uniform(0, 0.3) * SAMPLE_RATE)
    piece = speech[: n - start]
    out[start : start + piece.size] = piece
    peak = np.abs(out).max()
    return out / peak * np.float32(rng.uniform(0.3, 0.8)) if peak > 0 else out


# --- drawing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Character:
    """Drawing parameters of one character, in pixels and linear RGB in [0, 1]."""

    cx: float
    cy: float
    rx: float
    ry: float
    shape_power: float  # 2 = ellipse, larger = rounder-squarer
    skin: np.ndarray
    hair: np.ndarray | None
    clothes: np.ndarray
    eye: np.ndarray
    mouth: np.ndarray
    lips: np.ndarray
    mouth_half_width: float  # in units of rx
    motion: np.ndarray  # [4] amplitudes (px) and frequencies (Hz): ax, ay, fx, fy
    motion_phase: np.ndarray  # [2]
    blink_rate: float  # blinks per second


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) as float32 RGB [3]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _sample_character(
    rng: np.random.Generator, cfg: DataConfig, index: int, n_chars: int, style: str
) -> _Character:
    h, w = cfg.height, cfg.width
    if n_chars == 1:
        rx = w * rng.uniform(0.19, 0.27)
        cx = w * rng.uniform(0.4, 0.6)
    else:
        rx = w * rng.uniform(0.12, 0.15)
        cx = w * ((0.27, 0.73)[index] + rng.uniform(-0.03, 0.03))
    ry = rx * rng.uniform(1.1, 1.3)
    cy = h * rng.uniform(0.4, 0.52)
    if style == "realistic":
        skin = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.55), rng.uniform(0.7, 0.97))
    else:  # cartoon and flat characters may be any colour, always light enough for a dark mouth to show
        skin = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.8, 1.0))
    hair_colour = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.5))
    hair = hair_colour if rng.random() < 0.75 else None
    scale = w / 64.0
    return _Character(
        cx=cx,
        cy=cy,
        rx=rx,
        ry=ry,
        shape_power=float(rng.choice([2.0, 2.0, 3.0])),
        skin=skin,
        hair=hair,
        clothes=_hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.8)),
        eye=_hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.3)),
        mouth=_hsv(rng.uniform(0.95, 1.0), rng.uniform(0.5, 0.8), rng.uniform(0.1, 0.2)),
        lips=_hsv(rng.uniform(0.95, 1.0), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.65)),
        mouth_half_width=rng.uniform(0.26, 0.36),
        # Head sway amplitudes (px, scaled with the frame) and frequencies (Hz): ax, ay, fx, fy.
        motion=np.array(
            (*(rng.uniform((0.3, 0.2), (1.2, 0.8)) * scale), *rng.uniform((0.2, 0.3), (0.7, 0.9))), np.float32
        ),
        motion_phase=rng.uniform(0, 2 * np.pi, 2).astype(np.float32),
        blink_rate=rng.uniform(0.2, 0.5),
    )


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear gradient between two random colours along a random direction: float32 [H, W, 3]."""
    a = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.95))
    b = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.95))
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    s = (np.cos(angle) * (x / w - 0.5) + np.sin(angle) * (y / h - 0.5)) + 0.5
    s = np.clip(s, 0, 1)[..., None]
    return a * (1 - s) + b * s


def _blinks(rng: np.random.Generator, num_frames: int, rate: float) -> np.ndarray:
    """Eye openness per frame float32 [T] in [0, 1]: 3-frame blinks (about 190 ms) at Poisson times."""
    openness = np.ones(num_frames, np.float32)
    count = rng.poisson(rate * num_frames / FPS)
    for start in rng.integers(-1, num_frames, size=count):
        for k, closure in enumerate((0.6, 1.0, 0.6)):
            if 0 <= start + k < num_frames:
                openness[start + k] = min(openness[start + k], 1.0 - closure)
    return openness


def _draw(
    img: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    rx: float,
    ry: np.ndarray | float,
    colour: np.ndarray | float,
    power: float = 2.0,
    opacity: float = 1.0,
    hairline: np.ndarray | None = None,
    lit: bool = False,
) -> None:
    """Composite an anti-aliased (super)ellipse onto img [T, H, W, 3] in place.

    cx, cy [T, 1, 1] centres in pixels; ry scalar or [T, 1, 1]. The normalised radius minus 1, times the
    smaller radius, approximates the signed distance in pixels; a 1-pixel ramp around 0 gives the coverage,
    so sub-pixel motion and mouth opening change pixels smoothly. `hairline` [T, 1, 1]: keep only pixels
    above this y. `lit`: shade the colour as lit from the upper left (``realistic`` faces). Only the
    shape's bounding box over all frames is touched (most shapes are small).
    """
    h, w = img.shape[1:3]
    ry_max = float(np.max(ry))
    x0 = max(int(np.floor(np.min(cx) - rx - 1)), 0)
    x1 = min(int(np.ceil(np.max(cx) + rx + 1)), w)
    y0 = max(int(np.floor(np.min(cy) - ry_max - 1)), 0)
    y1 = min(int(np.ceil(np.max(cy) + ry_max + 1)), h)
    if x1 <= x0 or y1 <= y0:
        return
    x = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, None, :]
    y = (np.arange(y0, y1, dtype=np.float32) + 0.5)[None, :, None]
    su, sv = (x - cx) / rx, (y - cy) / ry
    u, v = np.abs(su), np.abs(sv)
    r = np.sqrt(u * u + v * v) if power == 2.0 else (u**power + v**power) ** (1.0 / power)
    alpha = np.clip(0.5 - (r - 1.0) * np.minimum(rx, ry), 0.0, 1.0)
    if hairline is not None:
        alpha *= np.clip(0.5 + (hairline - y), 0.0, 1.0)
    if opacity != 1.0:
        alpha *= opacity
    a = alpha[..., None]
    region = img[:, y0:y1, x0:x1]
    region *= 1.0 - a
    if lit:
        shade = 1.1 - 0.22 * ((su + 0.35) ** 2 + (sv + 0.35) ** 2)
        colour = np.clip(colour * shade[..., None], 0.0, 1.0)
    region += a * colour


def render_clip(
    rng: np.random.Generator,
    cfg: DataConfig,
    characters: list[_Character],
    mouth_open: np.ndarray,
    style: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the clip.

    Returns:
        video uint8 [T, H, W, 3], face boxes float32 [C, 4], mouth boxes float32 [C, T, 4] (x0, y0, x1, y1).
    """
    t_frames, h, w = cfg.num_frames, cfg.height, cfg.width
    img = np.broadcast_to(_background(rng, h, w), (t_frames, h, w, 3)).copy()
    time = (np.arange(t_frames, dtype=np.float32) / FPS)[:, None, None]
    face_boxes = np.zeros((len(characters), 4), np.float32)
    mouth_boxes = np.zeros((len(characters), t_frames, 4), np.float32)
    outline = np.float32(0.08)
    for c, ch in enumerate(characters):
        ax, ay, fx, fy = ch.motion
        cx = ch.cx + ax * np.sin(2 * np.pi * fx * time + ch.motion_phase[0])  # [T, 1, 1]
        cy = ch.cy + ay * np.sin(2 * np.pi * fy * time + ch.motion_phase[1])
        rx, ry, power = ch.rx, ch.ry, ch.shape_power
        # Shoulders, then the head (cartoon: a dark outline 1 px wider underneath).
        _draw(img, cx, cy + 1.3 * ry, 1.35 * rx, 0.55 * ry, ch.clothes)
        if style == "cartoon":
            _draw(img, cx, cy, rx + 1.0, ry + 1.0, outline, power)
        _draw(img, cx, cy, rx, ry, ch.skin, power, lit=style == "realistic")
        if ch.hair is not None:  # a cap over the top of the head, cut by a horizontal hairline
            _draw(img, cx, cy - 0.12 * ry, 1.04 * rx, 0.95 * ry, ch.hair, power, hairline=cy - 0.42 * ry)
        openness = _blinks(rng, t_frames, ch.blink_rate)[:, None, None]
        for side in (-1.0, 1.0):
            ex = cx + side * _EYE_X * rx
            ey = cy + _EYE_Y * ry
            if style == "flat":
                _draw(img, ex, ey, 0.11 * rx, (0.1 * openness + 0.02) * ry, ch.eye)
            else:
                _draw(img, ex, ey, 0.17 * rx, (0.12 * openness + 0.02) * ry, np.float32(0.95))
                _draw(img, ex, ey, 0.08 * rx, (0.09 * openness + 0.015) * ry, ch.eye)
        if style == "cartoon":  # cheeks
            for side in (-1.0, 1.0):
                _draw(img, cx + side * 0.55 * rx, cy + 0.22 * ry, 0.13 * rx, 0.08 * ry, _BLUSH, opacity=0.4)
        if style == "realistic":  # a nose shadow
            _draw(img, cx + 0.04 * rx, cy + 0.2 * ry, 0.07 * rx, 0.1 * ry, np.float32(0.2), opacity=0.35)
        my = cy + _MOUTH_Y * ry
        half_h = (_MOUTH_MIN_HALF_HEIGHT + (_MOUTH_MAX_HALF_HEIGHT - _MOUTH_MIN_HALF_HEIGHT)
                  * mouth_open[c][:, None, None]) * ry  # fmt: skip
        mhw = ch.mouth_half_width * rx
        if style != "flat":  # lips: a lighter red rim around the opening
            _draw(img, cx, my, mhw + 1.0, half_h + 1.0, ch.lips)
        _draw(img, cx, my, mhw, half_h, ch.mouth)

        cxf, cyf = cx[:, 0, 0], cy[:, 0, 0]
        face_boxes[c] = (
            cxf.min() - 1.35 * rx,
            cyf.min() - 1.1 * ry,
            cxf.max() + 1.35 * rx,
            cyf.max() + 1.1 * ry,
        )
        full_h = _MOUTH_MAX_HALF_HEIGHT * ry
        myf = cyf + _MOUTH_Y * ry
        mouth_boxes[c] = np.stack([cxf - mhw, myf - full_h, cxf + mhw, myf + full_h], axis=1)
    face_boxes[:, 0::2] = np.clip(face_boxes[:, 0::2], 0, w)
    face_boxes[:, 1::2] = np.clip(face_boxes[:, 1::2], 0, h)
    video = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return video, face_boxes, mouth_boxes

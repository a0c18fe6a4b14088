"""Lip-sync score on generated frames: the Sync-C / Sync-D analogue for the synthetic data set.

SyncNet needs downloaded weights and real faces; here the geometry is known. Every clip records, per
character and frame, the box of the fully open mouth (``Clip.mouth_boxes_px``). The mouth is the darkest
thing inside that box, so the measured opening of a frame is the mean darkness of the box relative to the
surrounding skin. The score is the Pearson correlation between that measurement and the audio envelope per
video frame, at offset 0 and at the best offset within +-``max_offset`` frames (SyncNet's AV offset):

- offset k > 0: the video lags the audio by k frames (frame t shows the mouth of audio frame t - k);
- ``confidence`` = best correlation - median correlation over offsets (Sync-C's "peak over median").

A frozen mouth scores ~0 (its measured opening's std is floored at MIN_OPENING_STD, see `pearson`); a
mouth moving at random scores near 0.
"""

from __future__ import annotations

import math

import numpy as np

from training.data import Clip

# A mouth whose measured opening varies by less than this (std, in darkness units) does not move. Speech
# moves the ground-truth mouths by ~0.04-0.1; a frozen mouth under head motion by ~0.0005-0.003.
MIN_OPENING_STD = 0.01
# ITU-R BT.601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _speaking_character(clip: Clip, character: int | None) -> int:
    if character is not None:
        if not 0 <= character < clip.num_characters:
            raise ValueError(f"character {character} out of range: the clip has {clip.num_characters}")
        return character
    if clip.speaker < 0:
        raise ValueError("the clip has no speaking character (a silent clip): lip-sync needs speech")
    return clip.speaker


def mouth_opening_from_frames(
    frames: np.ndarray, clip: Clip, character: int | None = None, margin_px: float = 1.0
) -> np.ndarray:
    """Measured mouth opening per frame, float32 [T] in [0, 1] (0 = the box is all skin).

    Args:
        frames: uint8 [T, H, W, 3] generated (or ground-truth) frames, the clip's size and frame count.
        clip: the clip whose geometry (mouth boxes) the frames follow.
        character: whose mouth; None = the clip's speaker.
        margin_px: grow the mouth box by this much on every side, so a generated head that sways a
            little differently from the ground truth still has its mouth inside.

    Each pixel's darkness is (skin - luma) / skin clipped to [0, 1], with `skin` the 90th percentile of
    luma in a box twice the mouth box's size (mostly cheek and chin); the opening is its mean in the box.
    """
    frames = np.asarray(frames)
    t_frames = clip.mouth_boxes_px.shape[1]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != t_frames:
        raise ValueError(
            f"frames must be uint8 [T={t_frames}, H, W, 3] like the clip, got shape {list(frames.shape)}"
        )
    if frames.shape[1:3] != clip.video.shape[1:3]:
        raise ValueError(
            f"frames are {frames.shape[1]}x{frames.shape[2]}, the clip's geometry is for "
            f"{clip.video.shape[1]}x{clip.video.shape[2]}; resize the frames first"
        )
    c = _speaking_character(clip, character)
    h, w = frames.shape[1:3]
    luma = (frames.astype(np.float32) / 255.0) @ _LUMA  # [T, H, W]
    boxes = clip.mouth_boxes_px[c].astype(np.float64)  # [T, 4]
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = (boxes[:, 2] - boxes[:, 0]) / 2 + margin_px
    half_h = (boxes[:, 3] - boxes[:, 1]) / 2 + margin_px
    skin = np.empty(t_frames, np.float32)
    for t in range(t_frames):
        outer = _pixels(luma[t], centre_x[t], centre_y[t], 2 * half_w[t], 2 * half_h[t], h, w)
        skin[t] = max(float(np.percentile(outer, 90)), 1e-3) if outer.size else 1.0
    darkness = np.clip((skin[:, None, None] - luma) / skin[:, None, None], 0.0, 1.0)
    # Pixels weighted by their area inside the box, so the measurement moves smoothly with sub-pixel
    # head motion instead of jumping when a box edge crosses a pixel centre.
    wx = _coverage(centre_x - half_w, centre_x + half_w, w)  # [T, W]
    wy = _coverage(centre_y - half_h, centre_y + half_h, h)  # [T, H]
    area = wy.sum(1) * wx.sum(1)
    opening = np.einsum("th,thw,tw->t", wy, darkness, wx) / np.maximum(area, 1e-9)
    return opening.astype(np.float32)


def _coverage(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """Overlap of pixel [i, i + 1) with the interval [lo, hi), float32 [T, size]."""
    edges = np.arange(size, dtype=np.float64)[None, :]
    return np.clip(np.minimum(edges + 1, hi[:, None]) - np.maximum(edges, lo[:, None]), 0.0, 1.0).astype(
        np.float32
    )


def _pixels(
    image: np.ndarray, cx: float, cy: float, half_w: float, half_h: float, h: int, w: int
) -> np.ndarray:
    """The pixels of a [H, W] image whose centres lie in the box, flattened."""
    x0, x1 = max(math.ceil(cx - half_w - 0.5), 0), min(math.floor(cx + half_w - 0.5) + 1, w)
    y0, y1 = max(math.ceil(cy - half_h - 0.5), 0), min(math.floor(cy + half_h - 0.5) + 1, h)
    return image[y0:y1, x0:x1].ravel()


def pearson(a: np.ndarray, b: np.ndarray, min_std_a: float = 0.0) -> float:
    """Pearson correlation of two [N] series; 0 when either is constant (no evidence either way).

    min_std_a: a floor added (in quadrature) to a's standard deviation, so a series that barely moves
    (a frozen mouth measured through sub-pixel head motion) cannot reach a high correlation by chance.
    """
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    denom = math.sqrt((float(a @ a) + len(a) * min_std_a**2) * float(b @ b))
    return float(a @ b) / denom if denom > 1e-12 else 0.0


def lagged_correlations(
    opening: np.ndarray, envelope: np.ndarray, max_offset: int, min_std: float = 0.0
) -> dict[int, float]:
    """Pearson(opening[t], envelope[t - k]) over the overlap, for k in -max_offset..max_offset
    (min_std: the floor on the opening's standard deviation, see `pearson`)."""
    n = len(opening)
    if len(envelope) != n:
        raise ValueError(f"opening has {n} frames, envelope {len(envelope)}")
    if not 0 <= max_offset <= n - 3:
        raise ValueError(f"max_offset={max_offset} must be in [0, T - 3] for T={n} frames")
    out = {}
    for k in range(-max_offset, max_offset + 1):
        if k >= 0:
            out[k] = pearson(opening[k:], envelope[: n - k], min_std)
        else:
            out[k] = pearson(opening[: n + k], envelope[-k:], min_std)
    return out


def lipsync_score(
    frames: np.ndarray, clip: Clip, max_offset: int = 6, character: int | None = None
) -> dict[str, float | int]:
    """Lip-sync of frames uint8 [T, H, W, 3] against the clip's audio envelope.

    Returns:
        correlation: Pearson correlation at offset 0 (the score: in a live stream a delayed mouth is out of
            sync); best_correlation and offset_frames: the best over -max_offset..max_offset frames (6 frames
            = 375 ms at 16 fps); confidence: best minus the median over offsets (Sync-C analogue).
    """
    opening = mouth_opening_from_frames(frames, clip, character)
    corr = lagged_correlations(opening, clip.envelope, max_offset, MIN_OPENING_STD)
    # Ties go to the offset nearest 0 (a frozen mouth gives all zeros: offset 0, not -max_offset).
    best = max(corr, key=lambda k: (round(corr[k], 9), -abs(k)))
    return {
        "correlation": corr[0],
        "best_correlation": corr[best],
        "offset_frames": best,
        "confidence": corr[best] - float(np.median(list(corr.values()))),
    }

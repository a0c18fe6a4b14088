"""``talkingmachines run --vae-decoder taew2.1`` end to end on the tiny preset: the fast decoder (seeded
random weights) writes a real MP4 with the frame count the Wan VAE path gives for the same audio."""

from __future__ import annotations

import math

import av
import numpy as np
import soundfile as sf
from run_helpers import read_frames, run_cli, write_inputs

AUDIO_S = 1.4  # 23 frames at 16 fps: 3 chunks (9 + 12 + 12 decoded, the last trimmed to 2)


def test_run_with_the_taew2_1_decoder_writes_the_expected_frames(tmp_path) -> None:
    image, audio = write_inputs(tmp_path, AUDIO_S)
    out, raw = tmp_path / "tae.mp4", tmp_path / "tae.u8"
    result = run_cli(
        image, audio, out, "--resolution", "32x32", "--decoder", "colocated", "--vae-decoder", "taew2.1",
        "--save-frames", str(raw),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = math.ceil(sf.info(str(audio)).duration * 16)
    frames = read_frames(raw, 32, 32)
    assert frames.shape == (expected, 32, 32, 3) == (23, 32, 32, 3)
    assert frames.std() > 1 and np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.5  # not constant
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (32, 32)
        assert sum(1 for _ in container.decode(video=0)) == expected

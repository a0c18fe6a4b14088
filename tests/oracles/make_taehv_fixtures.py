"""Write tests/fixtures/taehv/: madebyollin/taehv's decoder run on seeded weights, numbers ours must match.

Upstream's code cannot live in this repository, so this script imports ``taehv.py`` from a checkout given on
the command line, fills the decoder of ``TAEHV(checkpoint_path=None)`` (the ``taew2_1`` architecture: 16
latent channels, time x4, space x8) with deterministic weights, decodes a small random latent sequence and
saves only the inputs and upstream's outputs. tests/decoder/test_taehv.py (CI, no upstream needed) fills
``decoder.taehv.TAEHVDecoder`` by the same procedure, loads it through our loader (so the key names are
checked) and compares.

The weights are not stored: for each upstream ``decoder.*`` key, ``fill_tensor(key, shape)`` draws
``randn(shape)`` from a generator seeded by ``SEED + crc32(key)`` and scales it by ``WEIGHT_GAIN /
sqrt(fan_in)`` (weights) or ``BIAS_SCALE`` (biases), plus ``OUTPUT_BIAS_OFFSET`` for the output conv's bias
``decoder.22.bias``. The test reimplements it from this description.

Cases (float32, CPU; upstream in NTCHW, pixels in [0, 1] after its clamp):
- ``whole``: ``decode_video(x, parallel=True)`` of all latents;
- ``streamed``: ``StreamingTAEHV.decode`` fed chunk by chunk (``CHUNKS`` latents at a time), each chunk
  drained with ``decode()`` until it returns None; the frames of every chunk, concatenated (their counts
  are in meta.json).
``decode_video(x, parallel=False)`` is compared with ``whole`` here and the difference recorded.

Run (seconds; from the repository root):

    git -C /work/.mirror/madebyollin+taehv/repo show HEAD:taehv.py > /tmp/taehv-up/taehv.py
    python tests/oracles/make_taehv_fixtures.py --upstream /tmp/taehv-up \
        --commit $(git -C /work/.mirror/madebyollin+taehv/repo rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "taehv"
SEED = 2101
WEIGHT_GAIN = 1.0
BIAS_SCALE = 0.1
# The output conv's bias is raised by this much so most pixels land inside (0, 1), where upstream's clamp
# leaves them to compare (about 40% do without it: the raw output has mean ~0 and std ~0.3).
OUTPUT_BIAS_KEY, OUTPUT_BIAS_OFFSET = "decoder.22.bias", 0.5
LATENTS = (4, 16, 5, 5)  # T, C, h, w (upstream's NTCHW without N)
CHUNKS = (1, 2, 1)


def fill_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The deterministic value of parameter ``key`` (the module docstring's procedure)."""
    generator = torch.Generator().manual_seed(SEED + zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if key.endswith(".bias"):
        return values * BIAS_SCALE + (OUTPUT_BIAS_OFFSET if key == OUTPUT_BIAS_KEY else 0.0)
    fan_in = math.prod(shape[1:])
    return values * (WEIGHT_GAIN / math.sqrt(fan_in))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, required=True, help="directory holding upstream's taehv.py")
    parser.add_argument("--commit", default="unknown", help="upstream commit, recorded in meta.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.upstream))
    taehv = importlib.import_module("taehv")
    torch.manual_seed(0)
    model = taehv.TAEHV(checkpoint_path=None).eval()
    state = model.state_dict()
    keys = sorted(k for k in state if k.startswith("decoder."))
    model.load_state_dict({**state, **{k: fill_tensor(k, tuple(state[k].shape)) for k in keys}})

    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(LATENTS, generator=generator)
    with torch.no_grad():
        whole = model.decode_video(latents[None], parallel=True, show_progress_bar=False)[0]
        sequential = model.decode_video(latents[None], parallel=False, show_progress_bar=False)[0]
        streaming = taehv.StreamingTAEHV(model)
        pieces, counts, start = [], [], 0
        for size in CHUNKS:
            frames = []
            frame = streaming.decode(latents[None, start : start + size])
            while frame is not None:
                frames.append(frame[0])
                frame = streaming.decode()
            counts.append(len(frames))
            pieces.extend(frames)
            start += size
        streamed = torch.cat(pieces)
    inside = float(((whole > 0) & (whole < 1)).float().mean())
    meta = {
        "upstream": "github.com/madebyollin/taehv taehv.py",
        "commit": args.commit,
        "model": "TAEHV(checkpoint_path=None): the taew2_1 decoder architecture",
        "fill": {
            "seed": SEED,
            "weight_gain": WEIGHT_GAIN,
            "bias_scale": BIAS_SCALE,
            OUTPUT_BIAS_KEY: f"+{OUTPUT_BIAS_OFFSET}",
        },
        "decoder_keys": {k: list(state[k].shape) for k in keys},  # the test loads these names and shapes
        "decoder_parameters": sum(state[k].numel() for k in keys),
        "latents_tchw": list(LATENTS),
        "chunks": list(CHUNKS),
        "frames_per_chunk": counts,
        "whole_frames": whole.shape[0],
        "sequential_vs_parallel_max_abs": float((sequential - whole).abs().max()),
        "streamed_vs_whole_max_abs": float((streamed - whole).abs().max()),
        "share_of_pixels_inside_0_1": inside,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(
        {"latents": latents.contiguous(), "whole": whole.contiguous(), "streamed": streamed.contiguous()},
        OUT / "taew2_1_decode.safetensors",
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()

"""``benchmarks.vae_decode --decoders wan2.1,taew2.1``: both decoders time the same chunks, with the Wan frame
accounting, and the speed-up is computed from the recorded medians (a tiny, short run; no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.vae_decode import main


def test_the_benchmark_times_both_decoders_on_the_same_chunks(tmp_path: Path) -> None:
    out = tmp_path / "vae.json"
    main(["--preset", "tiny", "--height", "16", "--width", "16", "--chunks", "2", "--decoders",
          "wan2.1,taew2.1", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    for name in ("decode", "decode_chunk_at_once", "taew2.1_decode", "taew2.1_decode_chunk_at_once"):
        assert result[name]["frames_per_chunk"] == [9, 12], name
        assert len(result[name]["cpu_seconds_per_chunk"]) == 2
    assert result["taew2.1_decode"]["parameters"] == 9_844_611  # upstream's decoder (meta.json)
    assert result["taew2.1_chunk_at_once_vs_per_latent"]["max_abs_float"] < 1e-4
    speedup = result["taew2.1_speedup_later_chunk"]["decode"]
    wan, tae = (
        result["decode"]["later_chunk_seconds_median"],
        result["taew2.1_decode"]["later_chunk_seconds_median"],
    )
    assert speedup == round(wan / tae, 2)

"""benchmarks/forward_speed.py on the CPU (tiny preset, 32x32, a few passes): the JSON's shape, skips with
their reasons, and the variant table's extension point. Timings are recorded, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import forward_speed
from benchmarks.forward_speed import variant_table
from workers.factory import build_score_model
from workers.fp8 import Fp8Linear


@pytest.fixture(autouse=True)
def _keep_threads():
    """main() sets torch's threads (1 on the CPU); the rest of the session keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(tmp_path: Path, variants: str) -> dict:
    out = tmp_path / "fs.json"
    argv = [
        "--out",
        str(out),
        "--resolution",
        "32x32",
        "--warmup",
        "2",
        "--iters",
        "2",
        "--variants",
        variants,
    ]
    assert forward_speed.main(argv) == 0
    return json.loads(out.read_text())


def test_the_cpu_run_times_what_it_can_and_skips_the_rest_with_the_reason(tmp_path):
    doc = _run(tmp_path, "eager,attn-fa3,attn-cudnn,attn-sdpa,attn-math,cuda-graphs")
    assert doc["benchmark"] == "forward_speed" and doc["command"].startswith(
        "python -m benchmarks.forward_speed"
    )
    assert {"machine", "commit", "environment"} <= doc.keys() and doc["environment"]["torch"]
    assert doc["pass"] == {
        "window": "sparse-causal",
        "chunk_index": 2,
        "latent_shape": [16, 3, 4, 4],
        "tokens": 12,
    }
    by_name = {v["name"]: v for v in doc["variants"]}
    assert list(by_name) == ["eager", "attn-fa3", "attn-cudnn", "attn-sdpa", "attn-math", "cuda-graphs"]
    assert by_name["eager"]["status"] == "ok" and by_name["eager"]["attention_backend"] == "sdpa"
    assert len(by_name["eager"]["ms"]["samples"]) == 2
    assert by_name["attn-cudnn"]["status"] == "skipped" and "CUDA only" in by_name["attn-cudnn"]["reason"]
    assert (
        by_name["cuda-graphs"]["status"] == "skipped" and "--device cuda" in by_name["cuda-graphs"]["reason"]
    )
    assert by_name["attn-sdpa"]["max_abs_diff_vs_eager"] == 0.0  # auto is sdpa here: the same kernel
    assert by_name["attn-math"]["max_abs_diff_vs_eager"] < 1e-5  # float32 softmax in another order


def test_fp8_variants_run_last_and_are_skipped_without_fp8_matrix_products(tmp_path):
    names = [v.name for v in variant_table()]
    assert names[-2:] == ["fp8", "fp8+compiled"]  # they convert the model in place: nothing may follow
    doc = _run(tmp_path, "eager,fp8")
    by_name = {v["name"]: v for v in doc["variants"]}
    assert by_name["fp8"]["status"] == "skipped" and "compute capability" in by_name["fp8"]["reason"]


def test_the_fp8_transform_converts_the_linears_once(monkeypatch):
    model = build_score_model("tiny", seed=0)
    converted = forward_speed._to_fp8(model)
    layers = [m for m in converted.modules() if isinstance(m, Fp8Linear)]
    assert converted is model and layers
    assert forward_speed._to_fp8(model) is model
    assert [m for m in model.modules() if isinstance(m, Fp8Linear)] == layers  # not converted twice


def test_unknown_variants_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        forward_speed.main(["--out", str(tmp_path / "x.json"), "--variants", "eager,turbo"])
    assert "unknown variant(s) turbo; known: eager" in capsys.readouterr().err

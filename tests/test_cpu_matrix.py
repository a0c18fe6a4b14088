"""The equality tests (marker ``equality``: SP N vs 1, disaggregated vs self-contained, streaming vs full
sequence, FSDP vs one process, fast paths vs reference) again, in a fresh pytest process per cell of a small
CPU matrix, so that a CI machine with another thread count or another instruction set cannot turn them red.

The main run has one torch thread per rank (``--threads 1``) and this machine's own kernels. A cell reruns the
equality tests that are not also ``slow``: those (a whole ``run`` per topology compared as frames) repeat
in one process tree what the fast ones check on the same engines (SP on gloo, dedicated workers, streaming
vs full decode), and rerunning them twice cost about four of CI's twenty minutes. The cells:

- ``2-threads``: two torch threads in every process and rank (``TM_TEST_THREADS``; MKL and oneDNN then split
  rows and reductions differently);
- ``avx2``: PyTorch's own kernels, MKL and oneDNN held to AVX2 (``ATEN_CPU_CAPABILITY``,
  ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``), the instruction set of an AMD EPYC before Zen 4 — on
  an AVX-512 Intel Xeon this runs the other family's code paths (a float32 GEMM and an sdpa call gave other
  bits under it, checked on an Intel Xeon); on an AVX2 machine it is the native one.

MKL also takes other code paths on AMD than on Intel CPUs whatever the instruction set; no environment
setting reproduces that, which is why the tolerances are stated with room (tests/workers/test_sp_engine.py).

Each cell compiles into its own TorchInductor cache: kernels cached by an AVX-512 run and reused under
``ATEN_CPU_CAPABILITY=avx2`` gave NaN (torch 2.15; the cache key does not cover that setting), so a cache
shared between differently configured runs is not safe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CELL_ENV = "TM_CPU_MATRIX_CELL"
CELLS = {
    "2-threads": {"TM_TEST_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# The equality tests that exist today; a cell that selects fewer ran something else than it claims.
MIN_EQUALITY_TESTS = 60


def _env(cell: str, inductor_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CELLS[cell])
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    env[CELL_ENV] = cell
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_the_equality_tests_hold_in_another_cpu_setting(cell: str, tmp_path: Path) -> None:
    if os.environ.get(CELL_ENV):
        pytest.skip("already inside a matrix cell")
    env = _env(cell, tmp_path / "inductor")
    if cell == "avx2":  # the setting reaches PyTorch (MKL and oneDNN have no query; they read theirs alike)
        probe = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
        capability = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout
        assert capability.strip() == "AVX2", capability
    marker = "equality and not slow"
    cmd = [sys.executable, "-m", "pytest", "-m", marker, "-q", "-p", "no:cacheprovider", "tests"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, f"cell {cell} {CELLS[cell]}:\n{tail}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) >= MIN_EQUALITY_TESTS, tail

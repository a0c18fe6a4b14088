"""Where a benchmark number came from: machine, commit and command, recorded with every committed result."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository the benchmark runs from, with '+dirty' when tracked code has local changes.

    Committed results themselves (benchmarks/results/, training/results/) do not count: a benchmark that
    rewrites its own JSON, or runs after another one did, still measures the committed code. A copy of the
    tree without its ``.git`` (the GPU machine gets one) says its commit in ``TM_COMMIT``.
    """
    if os.environ.get("TM_COMMIT"):
        return os.environ["TM_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=_REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)training/results"],
                               capture_output=True, text=True, check=True, cwd=_REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def gpus() -> list[dict[str, Any]]:
    """Name and memory (GiB) of every visible CUDA device; empty on a CPU-only machine."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpus": gpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that produced the result, as it would be typed: `python -m MODULE ARGS...`."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: a busy machine explains noisy CPU timings."""
    return [round(x, 2) for x in os.getloadavg()]


def provenance(module: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """machine + commit + command, the header of every committed benchmark JSON."""
    return {
        "machine": {**machine(), "load_average_at_start": load_average()},
        "commit": git_commit(),
        "command": command(module, argv),
    }

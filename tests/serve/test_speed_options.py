"""--attention-backend and --cuda-graphs through the group options (run and serve alike): resolution on this
device, the environment default, refusals at start-up, and what the start-up line and /metrics show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import workers.attention as attn
from server.metrics import Metrics
from server.run_options import parse_run_options
from server.serve import parse_serve_options

RUN = ["--image", "i.png", "--audio", "a.wav", "--out", "o.mp4", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[2]


def _serve(tmp_path: Path, table: str = "") -> list[str]:
    config = tmp_path / "serve.toml"
    config.write_text(f'[serve]\n{table}\n[api]\napi_key = "k"\n')
    return ["--config", str(config), "--device", "cpu"]


def test_auto_resolves_to_sdpa_on_a_cpu_and_named_backends_stay_themselves(tmp_path, monkeypatch):
    monkeypatch.delenv("TM_ATTENTION_BACKEND", raising=False)
    assert parse_run_options(RUN).attention_backend == "sdpa"
    assert parse_run_options([*RUN, "--attention-backend", "math"]).attention_backend == "math"
    assert parse_serve_options(_serve(tmp_path)).attention_backend == "sdpa"
    assert parse_serve_options(_serve(tmp_path, 'attention_backend = "math"')).attention_backend == "math"


def test_the_environment_sets_the_default_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("TM_ATTENTION_BACKEND", "math")
    assert parse_run_options(RUN).attention_backend == "math"
    assert parse_run_options([*RUN, "--attention-backend", "sdpa"]).attention_backend == "sdpa"


@pytest.mark.skipif(attn.flash_available(), reason="flash-attn installed here")
def test_a_backend_this_device_cannot_run_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("TM_ATTENTION_BACKEND", raising=False)
    with pytest.raises(
        ValueError, match=r"--attention-backend fa2 cannot run here: flash-attn is not installed"
    ):
        parse_run_options([*RUN, "--attention-backend", "flash"])
    with pytest.raises(ValueError, match=r"--attention-backend cudnn cannot run here: .*CUDA only"):
        parse_serve_options(_serve(tmp_path, 'attention_backend = "cudnn"'))
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'xformers'"
    ):  # a config file skips choices
        parse_serve_options(_serve(tmp_path, 'attention_backend = "xformers"'))
    with pytest.raises(ValueError, match=r"--cuda-graphs .* needs --device cuda"):
        parse_serve_options([*_serve(tmp_path), "--cuda-graphs"])
    assert not parse_serve_options(_serve(tmp_path)).cuda_graphs


def test_the_cli_exits_2_naming_the_backend_and_the_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "run", *RUN, "--attention-backend", "fa3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "--attention-backend fa3 cannot run here" in result.stderr
    assert "Use --attention-backend auto (here: sdpa) or sdpa" in result.stderr


def test_metrics_export_the_engine_settings():
    metrics = Metrics()
    metrics.set_engine_info(attention_backend="fa2", cuda_graphs="false")
    text = metrics.render()[0].decode()
    assert 'tm_engine_info{attention_backend="fa2",cuda_graphs="false"} 1.0' in text

"""`python -m training.run`: help, argument errors, missing stages said plainly, stage plumbing."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from training import run


def test_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("vae", "teacher", "student", "all", "--minutes-budget", "--resume"):
        assert word in out


def test_unknown_stage_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--stage", "gan", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gan'" in capsys.readouterr().err


def test_missing_stage_module_is_reported_not_stubbed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "training.distill", None)  # import fails as if the file were absent
    (tmp_path / "vae").mkdir()
    assert run.main(["--stage", "all", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "training/distill.py" in err and "not in this checkout" in err
    assert not (tmp_path / "vae" / "vae.pth").exists()  # 'all' checks every stage before training any


def test_later_stage_without_the_earlier_output_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def train_student(cfg: _FakeTeacherConfig, out_dir: Path, resume: bool = False) -> Path:
        raise AssertionError("must not start without the VAE and teacher")

    fake = types.ModuleType("training.distill")
    fake.train_student = train_student
    monkeypatch.setitem(sys.modules, "training.distill", fake)
    assert run.main(["--stage", "student", "--out", str(tmp_path)]) == 2
    assert "run --stage vae first" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class _FakeTeacherConfig:
    vae_checkpoint: str | None = None
    minutes_budget: float | None = None
    steps: int = 10


def _fake_teacher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: type) -> list[tuple]:
    """A teacher stage (config class `config`) that records (cfg, out_dir, resume); a stage-A output."""
    calls: list[tuple] = []

    def train_teacher(cfg, out_dir: Path, resume: bool = False) -> Path:
        calls.append((cfg, Path(out_dir), resume))
        return Path(out_dir) / "teacher.safetensors"

    train_teacher.__annotations__["cfg"] = config  # what run.config_class reads
    fake = types.ModuleType("training.teacher")
    fake.train_teacher = train_teacher
    monkeypatch.setitem(sys.modules, "training.teacher", fake)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.pth").write_bytes(b"")
    return calls


def test_teacher_stage_gets_the_vae_path_budget_and_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_teacher(monkeypatch, tmp_path, _FakeTeacherConfig)
    argv = ["--stage", "teacher", "--out", str(tmp_path), "--minutes-budget", "7", "--steps", "3", "--resume"]
    assert run.main(argv) == 0
    assert calls == [
        (_FakeTeacherConfig(str(tmp_path / "vae" / "vae.pth"), 7.0, 3), tmp_path / "teacher", True)
    ]


@dataclasses.dataclass(frozen=True)
class _FakeTunableConfig:
    vae_checkpoint: str | None = None
    minutes_budget: float | None = None
    steps: int = 10
    device: str = "cpu"
    data_workers: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    crop: int | None = 32
    mixed: bool = False
    denoising_steps: tuple[int, ...] = (1000, 500)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")




def test_set_device_and_workers_reach_the_stage_config_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_teacher(monkeypatch, tmp_path, _FakeTunableConfig)
    argv = ["--stage", "teacher", "--out", str(tmp_path), "--data-workers", "3", "--device", "cpu",
            "--set", "teacher.batch_size=64", "--set", "lr=2.5e-3", "--set", "crop=none",
            "--set", "mixed=true", "--set", "denoising_steps=1000,750,500"]  # fmt: skip
    assert run.main(argv) == 0
    ((cfg, _, _),) = calls
    assert (cfg.device, cfg.data_workers, cfg.batch_size, cfg.lr) == ("cpu", 3, 64, 2.5e-3)
    assert cfg.crop is None and cfg.mixed is True and cfg.denoising_steps == (1000, 750, 500)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("batch_size=many", "cannot read 'many'"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("student.lr=1", "stage 'student' is not run here"),
        ("teacher.depth=3", "has no field 'depth'"),
        ("depth=3", "no field 'depth'"),
        ("lr", "expected [STAGE.]FIELD=VALUE"),
        ("mixed=maybe", "cannot read 'maybe'"),
    ],
)
def test_bad_settings_are_refused_before_any_training(
    setting: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    calls = _fake_teacher(monkeypatch, tmp_path, _FakeTunableConfig)
    assert run.main(["--stage", "teacher", "--out", str(tmp_path), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert calls == []

"""The training pipeline's command line.

    python -m training.run --stage vae|teacher|student|all --out DIR [--minutes-budget M] [--resume]

Stages write to DIR/vae, DIR/teacher and DIR/student; each later stage reads the earlier ones' outputs
(DIR/vae/vae.pth, DIR/teacher/teacher.safetensors) and refuses to start without them. ``--resume`` continues
every stage from its last saved training state. ``--minutes-budget`` is the wall-clock budget of the chosen
stage, or of the whole run for ``all`` (split vae 1/6, teacher 5/12, student 5/12); it applies to stages
whose config has a ``minutes_budget`` field, the others run their configured number of steps.

The teacher and student stages are ``training.teacher.train_teacher`` and ``training.distill.train_student``;
each is called as ``train_X(cfg, out_dir, resume)`` with its config class (the annotation of ``cfg``) built
from CPU-sized defaults plus the paths above.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STAGES = ("vae", "teacher", "student")
STAGE_MODULES = {"vae": ("training.vae_stage", "train_vae"), "teacher": ("training.teacher", "train_teacher"),
                 "student": ("training.distill", "train_student")}  # fmt: skip
BUDGET_SHARE = {"vae": 2 / 12, "teacher": 5 / 12, "student": 5 / 12}
VAE_OUTPUT = ("vae", "vae.pth")
TEACHER_OUTPUT = ("teacher", "teacher.safetensors")


class StageUnavailable(RuntimeError):
    """A stage's module is not in this checkout, or an earlier stage's output is missing."""


def stage_function(stage: str) -> Callable[..., Path]:
    """The `train_X` function of a stage; StageUnavailable (not a stub) when its module is absent."""
    module_name, function_name = STAGE_MODULES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # the module exists but one of its own imports is missing: a real error, show it
        raise StageUnavailable(
            f"stage {stage!r} needs {module_name.replace('.', '/')}.py ({function_name}), which is not in "
            "this checkout yet; it cannot train. Run the stages that exist (e.g. --stage vae)."
        ) from None
    function = getattr(module, function_name, None)
    if function is None:
        raise StageUnavailable(
            f"{module_name} has no {function_name}(cfg, out_dir, resume); cannot run stage {stage!r}"
        )
    return function


def config_class(function: Callable[..., Any]) -> type:
    """The dataclass type annotated on a stage function's `cfg` parameter."""
    cls = typing.get_type_hints(function).get("cfg")
    if cls is None or not dataclasses.is_dataclass(cls):
        raise StageUnavailable(
            f"{function.__module__}.{function.__name__}'s cfg parameter is not annotated with a dataclass"
        )
    return cls


def build_config(
    function: Callable[..., Any], out: Path, stage: str, minutes: float | None, steps: int | None
) -> Any:
    """The stage's config: class defaults, earlier stages' outputs, budget and step overrides."""
    cls = config_class(function)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if stage in ("teacher", "student"):
        vae = out.joinpath(*VAE_OUTPUT)
        if not vae.is_file():
            raise StageUnavailable(f"stage {stage!r} needs the trained VAE {vae}: run --stage vae first")
        values["vae_checkpoint"] = str(vae)
    if stage == "student":
        teacher = out.joinpath(*TEACHER_OUTPUT)
        if not teacher.is_file():
            raise StageUnavailable(f"stage 'student' needs the teacher {teacher}: run --stage teacher first")
        values["teacher_checkpoint"] = str(teacher)
    if minutes is not None:
        if "minutes_budget" in fields:
            values["minutes_budget"] = minutes
        else:
            print(f"note: {cls.__name__} has no minutes_budget; stage {stage!r} runs its configured steps")
    if steps is not None:
        values["steps"] = steps
    unknown = sorted(set(values) - fields)
    if unknown:
        raise StageUnavailable(
            f"{cls.__name__} has no field(s) {unknown}; cannot pass them to stage {stage!r}"
        )
    return cls(**values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train the TalkingMachines toy pipeline: VAE (stage A), audio-conditioned teacher "
        "(stage B), sparse-causal DMD student (stage C).",
    )
    parser.add_argument("--stage", required=True, choices=(*STAGES, "all"), help="which stage to run")
    parser.add_argument("--out", required=True, type=Path, help="output directory (one sub-folder per stage)")
    parser.add_argument(
        "--minutes-budget", type=float, default=None,
        help="wall-clock minutes for the stage (for 'all': the whole run, split 1/6, 5/12, 5/12)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--resume", action="store_true", help="continue from the last saved training state")
    args = parser.parse_args(argv)
    if args.minutes_budget is not None and args.minutes_budget <= 0:
        parser.error(f"--minutes-budget must be positive, got {args.minutes_budget}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def run_stage(stage: str, out: Path, minutes: float | None, steps: int | None, resume: bool) -> Path:
    function = stage_function(stage)
    cfg = build_config(function, out, stage, minutes, steps)
    start = time.perf_counter()
    path = function(cfg, out / stage, resume)
    print(f"[{stage}] done in {(time.perf_counter() - start) / 60:.1f} min -> {path}")
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    try:
        if args.stage == "all":  # fail before hours of training if a later stage cannot run
            for stage in stages:
                stage_function(stage)
        for stage in stages:
            minutes = args.minutes_budget
            if minutes is not None and args.stage == "all":
                minutes *= BUDGET_SHARE[stage]
            run_stage(stage, args.out, minutes, args.steps, args.resume)
    except StageUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training pipeline's command line.

    python -m training.run --stage vae|teacher|student|all --out DIR [--minutes-budget M] [--resume]
    python -m training.run --stage student --out DIR --student-chunk 7 --student-steps 4   # Table-1 variant
    python -m training.run --stage all --out DIR --device cuda --data-workers 12 --set teacher.batch_size=64

``--device`` trains on a GPU (the data is still drawn on the CPU, by ``--data-workers`` processes);
``--set [STAGE.]FIELD=VALUE`` overrides any scalar field of a stage's config (VAEStageConfig, TeacherConfig,
StudentConfig): with a STAGE prefix for that stage, without one for every chosen stage that has the field.

Stages write to DIR/vae, DIR/teacher and DIR/student; each later stage reads the earlier ones' outputs
(DIR/vae/vae.pth, DIR/teacher/teacher.safetensors) and refuses to start without them. ``--resume`` continues
every stage from its last saved training state. ``--minutes-budget`` is the wall-clock budget of the chosen
stage (set-up such as clip encoding included), or of the whole run for ``all``: each stage then gets its
share (vae 1/2, teacher 1/4, student 1/4) of the time still left, so an overrun is absorbed by the next
stage and the run ends within the budget. A finished student stage also writes DIR/<student dir>/bundle, the
model bundle ``talkingmachines run --checkpoint`` and ``training.evaluate --checkpoint`` take.

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
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STAGES = ("vae", "teacher", "student")
STAGE_MODULES = {"vae": ("training.vae_stage", "train_vae"), "teacher": ("training.teacher", "train_teacher"),
                 "student": ("training.distill", "train_student")}  # fmt: skip
BUDGET_SHARE = {"vae": 2 / 4, "teacher": 1 / 4, "student": 1 / 4}
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
    function: Callable[..., Any],
    out: Path,
    stage: str,
    minutes: float | None,
    steps: int | None,
    settings: dict[str, Any] | None = None,
) -> Any:
    """The stage's config: class defaults, earlier stages' outputs, budget and step overrides, then
    `settings` (field → value, already typed; see `parse_settings`)."""
    cls = config_class(function)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = dict(settings or {})
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


def _parse_value(cls: type, name: str, text: str) -> Any:
    """`text` as the type of dataclass field `name` of `cls` (int, float, str, bool, X | None, or a tuple
    of ints/floats written with commas); ValueError naming the field otherwise."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        if text.lower() == "none":
            return None
        hint = args[0]
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if hint in (int, float, str):
            return hint(text)
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            if item in (int, float):
                return tuple(item(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{cls.__name__}.{name}: cannot read {text!r} as {hint}") from None
    raise ValueError(f"{cls.__name__}.{name} ({hint}) cannot be set from the command line")


def parse_settings(items: Sequence[str], stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--set [STAGE.]FIELD=VALUE` items → per-stage typed field values; ValueError on a field that no
    chosen stage has, a stage not chosen, or a value of the wrong type."""
    out: dict[str, dict[str, Any]] = {stage: {} for stage in stages}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected [STAGE.]FIELD=VALUE")
        stage_name, dot, name = key.rpartition(".")
        targets = [stage_name] if dot else list(stages)
        for stage in targets:
            if stage not in out:
                raise ValueError(f"--set {item!r}: stage {stage!r} is not run here (stages: {list(stages)})")
        found = False
        for stage in targets:
            cls = config_class(stage_function(stage))
            if name in {f.name for f in dataclasses.fields(cls)}:
                out[stage][name] = _parse_value(cls, name, text)
                found = True
            elif dot:
                raise ValueError(f"--set {item!r}: {cls.__name__} has no field {name!r}")
        if not found:
            raise ValueError(f"--set {item!r}: no field {name!r} in the configs of {list(stages)}")
    return out


def student_overrides(chunk: int | None, denoising_steps: int | None) -> dict[str, Any]:
    """StudentConfig fields for a Table-1 variant (its own encoded-clip cache: chunking differs)."""
    overrides: dict[str, Any] = {}
    if chunk is not None:
        overrides["chunk_latents"] = chunk
    if denoising_steps is not None:
        overrides["denoising_steps"] = (1000, 750, 500, 250) if denoising_steps == 4 else (1000, 500)
    return overrides


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
        help="wall-clock minutes for the stage (for 'all': the whole run; vae 1/2, teacher and student "
        "1/4 each)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--resume", action="store_true", help="continue from the last saved training state")
    parser.add_argument(
        "--student-chunk", type=int, default=None, choices=(3, 7),
        help="student stage: latent frames per chunk (default 3); writes OUT/student_c{F}_s{S}",
    )  # fmt: skip
    parser.add_argument(
        "--student-steps", type=int, default=None, choices=(2, 4),
        help="student stage: denoising steps (default 2; 4 = 1000, 750, 500, 250)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None,
        help="train on this device (cpu, cuda, cuda:1); default cpu. Clips are drawn on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--data-workers", type=int, default=None,
        help="processes that draw and condition the training clips (default 0: in the training process)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="[STAGE.]FIELD=VALUE",
        help="override a config field, e.g. --set teacher.batch_size=64 --set lr=2e-3 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.data_workers is not None and args.data_workers < 0:
        parser.error(f"--data-workers must be >= 0, got {args.data_workers}")
    if args.minutes_budget is not None and args.minutes_budget <= 0:
        parser.error(f"--minutes-budget must be positive, got {args.minutes_budget}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def student_dir_name(chunk: int | None, denoising_steps: int | None) -> str:
    """`student` for the default schedule, `student_c{F}_s{S}` for a Table-1 variant."""
    if chunk is None and denoising_steps is None:
        return "student"
    return f"student_c{chunk or 3}_s{denoising_steps or 2}"


def run_stage(
    stage: str,
    out: Path,
    minutes: float | None,
    steps: int | None,
    resume: bool,
    overrides: dict[str, Any] | None = None,
    stage_dir: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    function = stage_function(stage)
    cfg = build_config(function, out, stage, minutes, steps, settings)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    start = time.perf_counter()
    path = Path(function(cfg, out / (stage_dir or stage), resume))
    print(f"[{stage}] done in {(time.perf_counter() - start) / 60:.1f} min -> {path}", flush=True)
    if stage == "student":
        bundle = export_bundle(cfg, path, out)
        print(f"[{stage}] model bundle (talkingmachines run --checkpoint {bundle.path}) written", flush=True)
    return path


def export_bundle(cfg: Any, student_path: Path, out: Path) -> Any:
    """Write `<student dir>/bundle`: the student, the VAE and the settings serving needs (model.json)."""
    from frontends.model_bundle import write_bundle
    from training.data import dit_data_config

    data = cfg.data if cfg.data is not None else dit_data_config()
    latents = 1 + (data.num_frames - 1) // 4
    chunk = int(cfg.chunk_latents)
    settings = {
        "preset": cfg.preset,
        "vae_preset": cfg.vae_preset,
        "height": data.height,
        "width": data.width,
        "train_latent_frames": (latents // chunk) * chunk,
        "chunk_latent_frames": chunk,
        "denoising_steps": list(cfg.denoising_steps),
        "timestep_shift": cfg.timestep_shift,
        "encoder_seed": 0,
        "prompt": "a person talking",
        "training": {"command": "python -m " + " ".join(["training.run", *sys.argv[1:]])},
    }
    return write_bundle(student_path.parent / "bundle", dit=student_path, vae=out.joinpath(*VAE_OUTPUT),
                        settings=settings)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    try:
        if args.stage == "all":  # fail before hours of training if a later stage cannot run
            for stage in stages:
                stage_function(stage)
        common = []
        if args.device is not None:
            common.append(f"device={args.device}")
        if args.data_workers is not None:
            common.append(f"data_workers={args.data_workers}")
        try:
            settings = parse_settings(common + list(args.settings), stages)
            for stage in stages:  # check every stage's values (types, ranges, device) before training
                config_class(stage_function(stage))(**settings[stage])
        except (TypeError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        for i, stage in enumerate(stages):
            minutes = args.minutes_budget
            if minutes is not None and args.stage == "all":
                # each stage gets its share of what is left, so an overrun of one is absorbed by the next
                left = minutes - (time.perf_counter() - start) / 60
                minutes = max(0.5, left * BUDGET_SHARE[stage] / sum(BUDGET_SHARE[s] for s in stages[i:]))
            overrides: dict[str, Any] = {}
            stage_dir = None
            if stage == "student" and (args.student_chunk or args.student_steps):
                overrides = student_overrides(args.student_chunk, args.student_steps)
                stage_dir = student_dir_name(args.student_chunk, args.student_steps)
            run_stage(
                stage, args.out, minutes, args.steps, args.resume, overrides, stage_dir, settings[stage]
            )
    except StageUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

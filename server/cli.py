"""The ``talkingmachines`` command: ``run`` (the main job: image + audio -> MP4), ``serve`` (the production
server: sessions API + LiveKit, see ``server.serve``) and ``inspect``.

Both commands take the same group options (``server.options``), validate everything they can before a
single rank starts (bad inputs exit with code 2 and a message naming the problem), then start the serving
group on this machine with ``server.launcher.launch`` — ``serve`` with ``survive_workers=True``, so the
server outlives a dead worker — or, under an external ``torchrun`` (multi-node; see ``server.launcher``),
run this process's rank directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from server.launcher import launch, under_torchrun
from server.run_options import build_run_parser, options_from_args, validate_inputs
from server.serve import build_serve_parser, parse_serve_options

EXIT_USAGE = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talkingmachines", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="generate a talking-head MP4 from a portrait and a speech clip",
        description="Generate a talking-head MP4 from a portrait and a speech clip with the real "
        "master/worker pipeline on this machine. The tiny preset serves the trained toy default "
        "(server/weights/tiny, 64x64, drawn characters); --random-weights gives seeded random weights "
        "(noise, for plumbing tests).",
    )
    build_run_parser(run)
    serve = commands.add_parser(
        "serve",
        help="the production server: sessions API, LiveKit avatar publishing, metrics",
        description="Serve live avatar sessions: FastAPI control plane on rank 0, LiveKit publishing, "
        "silence-mode video between utterances. The tiny preset serves the trained toy default "
        "(server/weights/tiny, 64x64); --random-weights gives seeded random weights (noise).",
    )
    build_serve_parser(serve)
    inspect = commands.add_parser("inspect", help="parameters, memory and FLOPs of a preset (meta device)")
    which = inspect.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a DiT preset (the other options go to workers.inspect)")
    which.add_argument("--vae", help="a VAE preset")
    return parser


def _run(args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    try:
        options = options_from_args(args)
        validate_inputs(options)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    rank_args = list(argv)
    if under_torchrun():
        from server.run_job import main as rank_main

        return rank_main(rank_args)
    # The ranks get 3 s after the first failure to report it themselves before they are stopped.
    return launch(options.topology(), "server.run_job:main", rank_args, settle_s=3.0)


def _serve(argv: list[str], parser: argparse.ArgumentParser) -> int:
    try:
        options = parse_serve_options(argv)
        if not under_torchrun():
            options.check_local_devices()
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    if under_torchrun():
        from server.serve import main as rank_main

        code = rank_main(argv)
    else:  # rank 0 serves in this process and outlives its workers (server.launcher, survive_workers)
        code = launch(options.topology(), "server.serve:main", argv, survive_workers=True)
    from server import engine_thread

    if engine_thread.LEFT_BEHIND:  # see engine_thread.LEFT_BEHIND: finalisation would abort
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if argv[:1] == ["inspect"] and "--preset" in argv:
        from workers.inspect import main as inspect_preset

        return inspect_preset(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "inspect":
        from decoder.inspect import main_inspect_vae

        print(main_inspect_vae(args.vae))
        return 0
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if args.command == "serve":
        return _serve(argv[1:], choices["serve"])
    run_parser = choices["run"]
    return _run(args, argv[1:], run_parser)


if __name__ == "__main__":
    sys.exit(main())

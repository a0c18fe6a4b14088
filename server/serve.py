"""``talkingmachines serve``: the production server — one serving group behind the HTTP control plane.

Ranks (every rank runs ``main(argv)`` with the same arguments):

- rank 0, the master: joins the world, builds the VAE, the conditioning encoders and the audio front-end,
  starts ``server.live_backend.LiveBackend`` (engine thread + LiveKit loop thread; it warms the group up with
  one throw-away chunk before ``/readyz`` turns true) and serves the FastAPI app of ``server.api`` with
  uvicorn on the main thread. SIGTERM starts a graceful drain (``Drain``): ``/readyz`` turns 503 "draining",
  new sessions get 503 with Retry-After, live calls go on until they end or ``drain_timeout_s`` passes; a
  second SIGTERM, or SIGINT, stops at once. On exit every session is closed (MP4s finalised, LiveKit
  participants leave), the workers get ``Shutdown`` and the process exits 0;
- ranks 1..: score workers, ``workers.worker_loop.run_worker_loop``.

On one machine the CLI starts the group with ``server.launcher.launch(..., survive_workers=True)``: a server
must outlive its workers (a dead worker fails its sessions, ``/readyz`` turns false, the API keeps
answering), so the launcher hosts the world's store, runs rank 0 in the CLI's own process (uvicorn owns the
main thread and the signals) and spawns ranks 1.. as children that die with it, instead of tearing the world
down when a rank fails as ``run`` does. Under an external ``torchrun`` each rank calls ``main`` directly.

Faults (``server.group_health``, ``server.score_group``): a watcher thread on the master notices a score
worker that died at once and one that hung (SIGSTOP, a wedged process) when its heartbeat is
``--heartbeat-timeout`` old (5 s), whatever the engine thread is blocked on; the group fails (sessions
failed with the reason, ``/readyz`` 503, creates refused at once). On one machine the master then heals the
group by itself: the failed workers are killed, new ones start in a new world, rank 0 rejoins it, warms up,
and ``/readyz`` turns true again (a few seconds on the tiny preset), at most ``--max-worker-restarts`` (3)
times within ``--worker-restart-window`` (600 s); past that the group stays failed and ``/readyz`` says it
gave up. Under an external torchrun the master cannot start ranks: the group stays failed and the
orchestrator must restart it as a whole.

The group's options (preset, topology, size, weights, dtype, steps, chunk size, decoder options, memory
budget, ``--pin-cores``, ``--rank-report``) are those of ``run``, defined and checked once in
``server.options``; ``ServeOptions`` adds the API's.

Configuration: ``--config FILE`` (TOML or JSON). Its ``[api]`` table is ``server.settings.ApiSettings``
(API key, limits, CORS, LiveKit credentials; ``TALKINGMACHINES_*`` environment variables override it); its
``[serve]`` table gives defaults for the command-line options below (same names, ``-`` or ``_``), e.g.::

    [serve]
    preset = "tiny"
    resolution = "32x32"
    decoder = "colocated"
    dtype = "auto"  # bfloat16 on CUDA, float32 on CPU

    [api]
    api_key = "change-me"
    livekit_api_key = "devkey"
    livekit_api_secret = "secret"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from server.audio_ledger import DEFAULT_MAX_PENDING_AUDIO_S
from server.options import GroupOptions, add_group_arguments, group_options
from server.settings import ApiSettings

log = logging.getLogger("talkingmachines.serve")


@dataclass(frozen=True, kw_only=True)
class ServeOptions(GroupOptions):
    """Validated ``serve`` arguments: the group's options plus the API's (sizes in pixels, times in
    seconds)."""

    config: Path | None
    host: str | None
    port: int | None
    ahead_s: float
    video_bitrate: int
    sync_probe: bool
    video_delay_frames: int
    log_level: str
    heartbeat_timeout_s: float = 5.0
    max_worker_restarts: int = 3
    worker_restart_window_s: float = 600.0
    max_pending_audio_s: float = DEFAULT_MAX_PENDING_AUDIO_S

    def api_settings(self) -> ApiSettings:
        # ApiSettings reads a file's [api] table, or the whole document when there is none (an API-only
        # file); a file with only a [serve] table leaves the API settings to the environment.
        serve_only = self.config is not None and {"serve"} >= set(_read_document(self.config))
        settings = ApiSettings.load(None if serve_only else self.config)
        update = {k: v for k, v in (("host", self.host), ("port", self.port)) if v is not None}
        return settings.model_copy(update=update) if update else settings


def build_serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``serve``'s arguments to ``parser``."""
    parser.add_argument("--config", type=Path, default=None, help="TOML/JSON with [api] and [serve] tables")
    parser.add_argument("--host", default=None, help="bind address (default: the config's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    add_group_arguments(parser, "serve", prompt_help="prompt when a session brings none")
    parser.add_argument(
        "--ahead",
        type=float,
        default=0.75,
        help="generate while a session's playout buffer is below this (s)",
    )
    parser.add_argument("--video-bitrate", type=int, default=1_000_000, help="LiveKit video bits/s")
    parser.add_argument(
        "--sync-probe",
        action="store_true",
        help="paint frames whose audio is loud white (to measure A/V offset at a subscriber; not for users)",
    )
    parser.add_argument(
        "--video-delay-frames",
        type=int,
        default=1,
        help="send LiveKit video this many frames after its audio (the receive path holds audio ~1 frame "
        "longer; see server.session_outputs.LiveKitSessionOutput)",
    )
    parser.add_argument(
        "--max-pending-audio-s",
        type=float,
        default=None,
        metavar="S",
        help="a session's cap on pending audio, accepted and not yet played (s; default "
        f"{DEFAULT_MAX_PENDING_AUDIO_S:g}, or --ahead + 3 chunks rounded up when that is more): an HTTP push "
        "past it gets 429 with Retry-After, a WebSocket sender is slowed (server.audio_ws); at least --ahead "
        "+ 3 chunks, what a real-time stream holds",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        help="a score worker whose heartbeat (every 0.5 s through the world's store, whatever the chunk "
        "traffic) is this old has stopped responding, and the group fails (s)",
    )
    parser.add_argument(
        "--max-worker-restarts",
        type=int,
        default=3,
        help="a failed group replaces its score workers by itself at most this often within "
        "--worker-restart-window, then stays failed (0: never; not under an external torchrun)",
    )
    parser.add_argument(
        "--worker-restart-window",
        type=float,
        default=600.0,
        help="the window of --max-worker-restarts (s)",
    )
    return parser


def _read_document(path: Path) -> dict[str, Any]:
    """The config file as a dict (TOML or JSON); ValueError naming the file when it is unreadable."""
    try:
        text = path.read_text()
        document = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {str(path)!r} cannot be read as TOML/JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of settings")
    return document


def _config_defaults(argv: list[str]) -> dict[str, Any]:
    """The ``[serve]`` table of ``--config FILE`` as parser defaults ({} without a config)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config", type=Path, default=None)
    known, _ = probe.parse_known_args(argv)
    if known.config is None:
        return {}
    table = _read_document(known.config).get("serve", {})
    if not isinstance(table, dict):
        raise ValueError(f"config file {str(known.config)!r}: 'serve' must be a table of options")
    return {key.replace("-", "_"): value for key, value in table.items()}


def parse_serve_options(argv: list[str], *, check_memory: bool = True) -> ServeOptions:
    """Parse and validate ``serve``'s arguments (config ``[serve]`` table < command line).

    check_memory: refuse a group whose memory plan (``engine.memory_plan``, ``max_sessions`` sessions) does
    not fit the devices. Done once before any rank starts; the ranks parse again without it (by then other
    ranks hold memory the plan already counts).
    """
    parser = build_serve_parser(argparse.ArgumentParser(prog="talkingmachines serve"))
    defaults = _config_defaults(argv)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"config [serve] has unknown option(s) {unknown}; the options are {sorted(known)}")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.video_delay_frames < 0:
        raise ValueError(f"--video-delay-frames must be >= 0, got {args.video_delay_frames}")
    if args.ahead <= 0:
        raise ValueError(f"--ahead must be positive seconds, got {args.ahead}")
    if args.max_worker_restarts < 0 or args.worker_restart_window <= 0:
        raise ValueError("--max-worker-restarts must be >= 0 and --worker-restart-window positive, got "
                         f"{args.max_worker_restarts} and {args.worker_restart_window}")
    if args.heartbeat_timeout < 1.0:
        raise ValueError(f"--heartbeat-timeout must be at least 1 s (a beat is every 0.5 s), got "
                         f"{args.heartbeat_timeout}")
    options = group_options(
        args,
        ServeOptions,
        config=args.config,
        host=args.host,
        port=args.port,
        ahead_s=args.ahead,
        video_bitrate=args.video_bitrate,
        sync_probe=args.sync_probe,
        video_delay_frames=args.video_delay_frames,
        log_level=args.log_level,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_worker_restarts=args.max_worker_restarts,
        worker_restart_window_s=args.worker_restart_window,
        max_pending_audio_s=args.max_pending_audio_s or DEFAULT_MAX_PENDING_AUDIO_S,
    )
    if args.max_pending_audio_s is None:  # the default grows with --ahead, so that raising it just works
        cap = max(DEFAULT_MAX_PENDING_AUDIO_S, math.ceil(pending_audio_floor(options)))
        options = dataclasses.replace(options, max_pending_audio_s=float(cap))
    if options.degrade.enabled and options.degrade.leave_s >= options.ahead_s:
        raise ValueError(
            f"--degrade-leave {options.degrade.leave_s:g} is never reached: a session's buffer stays under "
            f"--ahead {options.ahead_s:g} s, so its slack does too; lower --degrade-leave or raise --ahead"
        )
    check_max_pending_audio(options)
    settings = options.api_settings()  # a missing API key or a bad [api] table fails before any rank starts
    if check_memory:
        from engine.memory_plan import check_options_memory

        check_options_memory(options, sessions=settings.max_sessions, sessions_option="max_sessions")
    return options


def pending_audio_floor(options: ServeOptions) -> float:
    """Seconds of audio a real-time stream holds unplayed: ``--ahead`` plus three chunks."""
    return options.ahead_s + 3 * options.stream_config().chunk_duration_s(1)


def check_max_pending_audio(options: ServeOptions) -> None:
    """``--max-pending-audio-s`` must hold what a real-time stream keeps unplayed in the pipeline (the
    featurizers' look-ahead, the chunk in flight, the playout buffer up to ``--ahead``): below that, a sender
    at real time would be throttled and the video would go silent between its pushes. Raises ValueError."""
    cap = options.max_pending_audio_s
    floor = pending_audio_floor(options)
    if not math.isfinite(cap) or cap < floor:
        raise ValueError(
            f"--max-pending-audio-s {cap:g} is below {floor:g} s, what a real-time stream holds unplayed "
            f"(--ahead {options.ahead_s:g} s + 3 chunks); give at least {math.ceil(floor)} (default "
            f"{DEFAULT_MAX_PENDING_AUDIO_S:g})"
        )


# ---- ranks ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """The rank entry: rank 0 serves, the others run the worker loop. Returns the rank's exit code."""
    from server.rank_main import run_rank

    options = parse_serve_options(argv, check_memory=False)  # checked before the ranks started
    return run_rank(
        options,
        lambda groups, store, score_rank: _serve_master(options, groups, store, score_rank),
        plan_sessions=options.api_settings().max_sessions,
    )


def _serve_master(options: ServeOptions, groups: Any, store: dist.Store, score_rank: Any) -> int:
    import uvicorn

    from engine.executor import ColocatedExecutor, DedicatedExecutor, Executor
    from frontends.conditioning import ConditioningConfig, ConditioningEncoders
    from server.api import create_app
    from server.launcher import local_workers
    from server.live_backend import LiveBackend, LiveConfig
    from server.master import build_decode_options, build_master_vae
    from server.metrics import Metrics
    from server.score_group import ScoreGroup

    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    settings = options.api_settings()
    topology = groups.topology
    stream = options.stream_config()
    device = groups.device

    def make_executor(world: Any, world_store: dist.Store, own_share: Any) -> Executor:
        """The transport to the workers of ``world`` (the first one, and each that replaces it)."""
        if world.topology.step_pipeline:
            from engine.step_pipeline import StepPipelineExecutor

            return StepPipelineExecutor(world, world_store, stream, result_timeout_s=options.chunk_timeout_s)
        if world.topology.disaggregated:
            return DedicatedExecutor(
                world, world_store, stream, result_timeout_s=options.chunk_timeout_s
            )
        return ColocatedExecutor(world, world_store, own_share)

    score_group = ScoreGroup(
        options, make_executor, groups, store, score_rank, local_workers(), options.heartbeat_timeout_s
    )
    vae = build_master_vae(options, device)
    encoders = ConditioningEncoders.from_config(
        ConditioningConfig.for_model(
            options.model_config,
            clip_checkpoint=options.clip_checkpoint,
            umt5_checkpoint=options.umt5_checkpoint,
            tiny_seed=options.tiny_encoder_seed,
            device=str(device),
            dtype=options.torch_dtype,
        )
    )
    metrics = Metrics(session_labels=settings.metrics_session_labels)
    metrics.set_engine_info(
        attention_backend=options.attention_backend, cuda_graphs=str(options.cuda_graphs).lower()
    )
    config = LiveConfig(
        model=options.model_config,
        stream=stream,
        seed=options.seed,
        default_prompt=options.prompt,
        ahead_s=options.ahead_s,
        video_bitrate=options.video_bitrate,
        sync_probe=options.sync_probe,
        video_delay_frames=options.video_delay_frames,
        wav2vec_checkpoint=options.wav2vec_checkpoint,
        encoder_seed=options.tiny_encoder_seed,
        decode=build_decode_options(options, device),
        degrade=options.degrade,
        max_batch_sessions=options.max_batch_sessions,
        max_pending_audio_s=options.max_pending_audio_s,
    )
    backend = LiveBackend(
        config,
        score_group.executor,
        vae,
        encoders,
        metrics,
        faults=score_group.faults if score_group.workers else None,
        renewal=score_group.renewal(options.max_worker_restarts, options.worker_restart_window_s),
    ).start()
    app = create_app(backend, settings, metrics)
    server = _graceful_server_class()(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=options.log_level,
            lifespan="off",
            ws_max_size=settings.max_ws_message_bytes,
        )
    )
    drain = Drain(backend, settings.drain_timeout_s, settings.retry_after_s, stop=server.stop_now)
    server.on_sigterm = drain.begin
    log.info(
        "talkingmachines serve: %s, preset %s (%s), dtype %s, attention %s%s, %dx%d @ %d fps "
        "on http://%s:%d; %s",
        topology.name,
        options.preset,
        options.weights,
        options.dtype,
        options.attention_backend,
        ", cuda graphs" if options.cuda_graphs else "",
        stream.width,
        stream.height,
        stream.fps,
        settings.host,
        settings.port,
        options.fp8_summary,
    )
    from engine.memory_plan import plan_for_options

    log.info("%s", plan_for_options(options, sessions=settings.max_sessions).summary())
    try:
        server.run()
    finally:
        backend.shutdown(drain.end_reason)
        score_group.close()
    return 0


class Drain:
    """The graceful drain of a serving group (started by SIGTERM).

    ``begin()`` makes the backend refuse new sessions (503, ``Retry-After: retry_after_s``; ``/readyz`` 503
    "draining") and starts a watcher thread that calls ``stop()`` once no session is live, or once
    ``timeout_s`` seconds have passed — the caller then closes the sessions still live. ``begin()`` again
    (a second SIGTERM) calls ``stop()`` at once.

    Args:
        backend: a ``LiveBackend`` (``begin_drain``, ``live_count``).
        timeout_s: how long live calls may go on; 0 stops at once.
        retry_after_s: the Retry-After of refused sessions, seconds.
        stop: ends the server (safe to call from any thread, more than once).
    """

    _POLL_S = 0.1

    def __init__(self, backend: Any, timeout_s: float, retry_after_s: float, stop: Any) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.stop = stop
        self.end_reason = "server stopping"
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        if self._thread is not None:
            log.info("second SIGTERM while draining; closing every session now")
            self.end_reason = "server stopping: a second SIGTERM cut the drain short"
            self.stop()
            return
        why = f"draining: the server is shutting down (up to {self.timeout_s:g} s); use another server"
        self.backend.begin_drain(self.retry_after_s, why)
        # begin() runs in a signal handler: the rest (locks, logging) happens on the watcher thread.
        self._thread = threading.Thread(target=self._watch, name="drain", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        log.info(
            "received SIGTERM; draining: new sessions refused, %d live session(s) go on for up to %g s "
            "(a second SIGTERM stops at once)",
            self.backend.live_count(),
            self.timeout_s,
        )
        while self.backend.live_count() > 0:
            if time.monotonic() >= deadline:
                log.info("drain timeout of %g s reached; closing every session", self.timeout_s)
                self.end_reason = f"server stopping: the drain timeout of {self.timeout_s:g} s ran out"
                break
            time.sleep(self._POLL_S)
        else:
            log.info("drain done: no live session left; stopping")
        self.stop()


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server with our signal handling. SIGTERM calls ``on_sigterm`` (the drain; set after
        construction), SIGINT stops at once. Either way the server only stops: uvicorn re-raises a caught
        signal after its own shutdown, which would kill rank 0 before it closes the sessions (unfinished
        MP4s, LiveKit participants left behind) and sends the workers ``Shutdown``."""

        on_sigterm: Any = None

        def stop_now(self) -> None:
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(signum: int, _frame: object) -> None:
                if signum == signal.SIGTERM and self.on_sigterm is not None:
                    self.on_sigterm()
                    return
                log.info("received %s; closing every session", signal.Signals(signum).name)
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer

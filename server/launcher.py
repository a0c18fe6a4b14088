"""Start a serving group on this machine, or join one that an external ``torchrun`` started.

On one machine, ``launch(topology, "package.module:function", args)`` starts ``topology.world_size`` rank
processes (``python -m server.launcher package.module:function ARGS…``) and supervises them:

- Each rank gets the ``env://`` variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``). The launcher hosts the world's TCPStore itself (as torchrun's agent
  does, via ``TORCHELASTIC_USE_AGENT_STORE``), so the port is bound before any rank starts and the store —
  with the ranks' heartbeats — outlives any rank.
- The launcher watches the children's exit codes every 20 ms. The first rank to fail is the root cause:
  its rank, role and exit code or signal are printed; the other ranks get ``settle_s`` (1 s) to notice the
  lost peer and exit by themselves, then SIGTERM, then SIGKILL after ``shutdown_grace_s``, and all are
  reaped before ``launch`` returns non-zero. A rank whose own failure is
  only the consequence of a lost peer (exit code ``EXIT_PEER_LOST``) is never named as the root cause when a
  rank that failed on its own is known.
- Each rank puts itself in its own session (Ctrl-C reaches the launcher, which stops the ranks in order)
  and asks the kernel to SIGKILL it if the launcher dies (``PR_SET_PDEATHSIG``), so even a SIGKILL-ed
  launcher leaves no orphans.

``launch(..., survive_workers=True)`` is the server's mode (``talkingmachines serve``): a server must outlive
its workers (a dead worker fails its sessions, ``/readyz`` turns false, the API keeps answering; it notices
through the rank registry and the heartbeats). The launcher still hosts the store and spawns ranks 1.. as
children that die with it, but runs rank 0's entry in its own process (so the entry, e.g. uvicorn, owns the
main thread and the signals), does not stop the world when a worker dies (it only says so on stderr), and
stops the remaining workers when rank 0's entry returns; rank 0's exit code is the launcher's. Rank 0 may
also replace its workers (``local_workers().replace()``: the old ones killed, a new store on a new port, ranks
1.. started again, rank 0 rejoining with ``init_rank``), which is how ``serve`` heals a failed group.

Why not ``torch.distributed.launcher.api.elastic_launch``: it was tried. It tears the world down well, but
it picks the root cause by whole-second timestamps, so when a killed worker makes its peers fail in the same
second it can name a healthy rank; its rendezvous also adds about a second of start-up per run.

Multi-node (or any external launcher): run the same CLI under torchrun on every node; ``under_torchrun()``
is then true and the CLI calls its rank function directly instead of ``launch``. For example, a 4+1 group
over two nodes (3 ranks on node 0, 2 on node 1)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 3 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29400 --rdzv-id avatar-1 --max-restarts 0 \\
        -m server.cli run --score-workers 4 --decoder dedicated …
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29400 --rdzv-id avatar-1 --max-restarts 0 \\
        -m server.cli run --score-workers 4 --decoder dedicated …

``--max-restarts 0``: a serving group holds per-session state (KV caches), so a restarted rank cannot
rejoin; fail and let the orchestrator replace the group. (``serve`` replaces its failed score workers itself
only on one machine, where this launcher started them; under torchrun its group stays failed, ``/readyz``
says so, and the orchestrator must restart the whole group.) Global rank 0 (node 0, local rank 0) is the
master. ``--nproc-per-node`` may differ per node; the total must equal ``topology.world_size``.

Inside each rank, ``init_rank(topology)`` initialises torch.distributed and builds the groups;
``shutdown()`` leaves the world.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib
import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from proto.liveness import PeerError
from proto.topology import ProcessGroups, Topology

# Exit code of a rank that failed because a peer vanished or hung (PeerError, broken gloo pair): a
# secondary failure, never reported as the root cause while a primary one is known.
EXIT_PEER_LOST = 75

_REPO_ROOT = Path(__file__).resolve().parent.parent
_POLL_S = 0.02
_PR_SET_PDEATHSIG = 1
_LAUNCHER_PID_ENV = "TM_LAUNCHER_PID"
_MESSAGE_PREFIX = "talkingmachines"


def under_torchrun() -> bool:
    """True in a rank process of a launched world (torchrun, this launcher, any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# ---- the launcher side ----------------------------------------------------------------------------


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen[bytes]
    exit_code: int | None = None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_PEER_LOST:
        return f"exit code {code} (it lost a peer)"
    return f"exit code {code}"


def _check_entry(entry: str) -> None:
    module, sep, function = entry.partition(":")
    if not sep or not module or not function:
        raise ValueError(f"entry {entry!r} must be 'package.module:function'")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"entry {entry!r}: module {module!r} is not importable from {sys.path[0]!r}")


def launch(
    topology: Topology,
    entry: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    settle_s: float = 1.0,
    shutdown_grace_s: float = 3.0,
    survive_workers: bool = False,
) -> int:
    """Run ``entry(args)`` in ``topology.world_size`` rank processes on this machine; return the exit code.

    ``entry`` is ``"package.module:function"``; the function takes the argument list and returns an exit
    code (``None`` = 0). ``env`` is added to each rank's environment (``PYTHONPATH`` is prepended, the repo
    root always comes first). 0 means every rank exited 0; otherwise the failing rank's exit code (128 +
    signal number for a signal), after all ranks are gone and the root cause is printed on stderr.

    After the first failure the other ranks get ``settle_s`` seconds to notice the lost peer and exit on
    their own (printing what they were waiting for), then SIGTERM, then SIGKILL after ``shutdown_grace_s``.

    ``survive_workers``: run rank 0 in this process and let it outlive its workers (module docstring);
    ``settle_s`` does not apply, ``shutdown_grace_s`` is the workers' grace when rank 0 returns.
    """
    _check_entry(entry)
    if topology.device == "cuda" and torch.cuda.device_count() < topology.world_size:
        raise ValueError(f"topology {topology.name!r} needs {topology.world_size} GPUs on this machine, "
                         f"{torch.cuda.device_count()} are visible; lower --score-workers or use "
                         "--decoder colocated")
    store = _world_store_server(topology)
    base_env = _rank_environment(topology, store.port, env or {})
    if survive_workers:
        try:
            return _run_rank0_here(topology, entry, list(args), base_env, env or {}, shutdown_grace_s)
        finally:
            del store
    ranks: list[_Rank] = []
    previous_handlers = _forward_signals_to(ranks)
    try:
        for rank in range(topology.world_size):
            ranks.append(_spawn(rank, entry, args, base_env))
        failed = _watch(ranks)
        if failed is not None:
            _settle(ranks, settle_s)
    finally:
        _stop_all(ranks, shutdown_grace_s)
        _restore_signals(previous_handlers)
        del store
    if failed is None:
        return 0
    code = failed.exit_code if failed.exit_code is not None else 1
    stopped = [r.rank for r in ranks if r is not failed]
    print(f"{_MESSAGE_PREFIX}: rank {failed.rank} ({topology.role(failed.rank)}) failed first: "
          f"{_describe_exit(code)}; stopped the other ranks {stopped} of {topology.name!r}",
          file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code


def _spawn(rank: int, entry: str, args: Sequence[str], base_env: Mapping[str, str]) -> _Rank:
    """Start ``python -m server.launcher ENTRY ARGS`` as ``rank``, in its own session."""
    rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
    proc = subprocess.Popen([sys.executable, "-m", "server.launcher", entry, *args], env=rank_env,
                            start_new_session=True)
    return _Rank(rank, proc)


def _run_rank0_here(
    topology: Topology,
    entry: str,
    args: list[str],
    base_env: dict[str, str],
    extra: Mapping[str, str],
    grace_s: float,
) -> int:
    """``survive_workers``: spawn ranks 1.., run rank 0's entry here, stop the workers when it returns."""
    global _LOCAL_WORKERS
    workers = LocalWorkers(topology, entry, args, base_env)
    saved = dict(os.environ)
    try:
        workers.start()
        world = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        os.environ.update(extra)
        os.environ.update({k: base_env[k] for k in world}, RANK="0", LOCAL_RANK="0")
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True")  # this process hosts the store
        _LOCAL_WORKERS = workers
        return _call_entry(entry, args)
    finally:
        _LOCAL_WORKERS = None
        workers.stop(grace_s)
        os.environ.clear()
        os.environ.update(saved)


class LocalWorkers:
    """``survive_workers``: the score-worker ranks (1..) this launcher runs for rank 0, which runs in this
    process and may ask about them or replace them (``local_workers()``).

    Each worker is reaped when it exits (the rank registry then sees it gone, not a zombie of ours), and its
    exit is said on stderr unless this class ended it (``stop``, ``kill``, ``replace``).

    ``replace()`` gives rank 0 a fresh set of workers in a fresh world: the old ones are SIGKILL-ed (a
    stopped process too) and reaped, a new store is bound on a new port (``MASTER_PORT`` of this process
    and of the new ranks), and ranks 1.. start again; rank 0 then joins the new world with ``init_rank``.
    Workers are spawned from one long-lived thread of this class, as ``PR_SET_PDEATHSIG`` fires when the
    *thread* that spawned a rank exits, and the caller of ``replace`` may be a thread that ends first.
    """

    def __init__(
        self, topology: Topology, entry: str, args: Sequence[str], base_env: Mapping[str, str]
    ) -> None:
        self.topology = topology
        self.entry = entry
        self.args = list(args)
        self.base_env = dict(base_env)
        self.generation = 0  # how many times the workers were replaced
        self._workers: list[_Rank] = []
        self._retired: set[int] = set()  # pids stopped or killed on purpose: their exit is not news
        self._reapers: list[threading.Thread] = []
        self._stores: list[dist.TCPStore] = []  # the store of the current world (a replaced one's)
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # rank 0 returned: no new workers
        self._spawns: queue.Queue[tuple[int, Future[_Rank]]] = queue.Queue()
        threading.Thread(target=self._spawner, name="spawn-workers", daemon=True).start()

    def start(self) -> None:
        with self._lock:
            self._start()

    def exit_status(self, rank: int) -> str | None:
        """How rank ``rank`` exited ("killed by SIGKILL", "exit code 1"); None while it runs."""
        for worker in self._workers:
            if worker.rank == rank and worker.exit_code is not None:
                return _describe_exit(worker.exit_code)
        return None

    def kill(self) -> None:
        """SIGKILL every current worker's process group now (stopped processes too); safe from any thread.
        Their exits are not reported: they are being replaced."""
        for worker in list(self._workers):
            self._retired.add(worker.proc.pid)
            if worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.proc.pid, signal.SIGKILL)

    def replace(self) -> None:
        """Kill and reap the current workers, bind a new store, start ranks 1.. again (see the class
        docstring). ``os.environ["MASTER_PORT"]`` is the new store's port when it returns."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the launcher is stopping: no new workers")
            self.kill()
            for worker in self._workers:
                worker.proc.wait()
            store = _world_store_server(self.topology)
            self._stores = [store]
            self.base_env["MASTER_PORT"] = os.environ["MASTER_PORT"] = str(store.port)
            self.generation += 1
            self._start()

    def stop(self, grace_s: float) -> None:
        """Stop every worker (SIGTERM, SIGKILL after ``grace_s``) and reap them. A worker that had exited
        before is still reported (by its reaper, which this waits for)."""
        self._stopping.set()
        with self._lock:
            for worker in self._workers:
                if _running(worker.proc.pid):
                    self._retired.add(worker.proc.pid)
            _stop_all(self._workers, grace_s)
        self._spawns.put((-1, Future()))  # ends the spawner thread
        for reaper in self._reapers:
            reaper.join(timeout=1)

    def _start(self) -> None:
        workers: list[_Rank] = []
        try:
            for rank in range(1, self.topology.world_size):
                future: Future[_Rank] = Future()
                self._spawns.put((rank, future))
                workers.append(future.result())
        finally:
            self._workers = workers  # what started is stopped with the rest, even if a spawn failed
        for worker in workers:
            reaper = threading.Thread(target=self._reap, args=(worker,), name=f"reap-rank{worker.rank}",
                                      daemon=True)
            reaper.start()
            self._reapers.append(reaper)

    def _spawner(self) -> None:
        while True:
            rank, future = self._spawns.get()
            if rank < 0:
                return
            try:
                future.set_result(_spawn(rank, self.entry, self.args, self.base_env))
            except BaseException as exc:
                future.set_exception(exc)

    def _reap(self, worker: _Rank) -> None:
        code = worker.proc.wait()
        worker.exit_code = code
        if code != 0 and worker.proc.pid not in self._retired:
            print(f"{_MESSAGE_PREFIX}: rank {worker.rank} ({self.topology.role(worker.rank)}) exited: "
                  f"{_describe_exit(code)}; rank 0 goes on without it", file=sys.stderr, flush=True)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (it has not exited, stopped processes included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _world_store_server(topology: Topology) -> dist.TCPStore:
    """The world's TCPStore, hosted by this process on a free loopback port (the ranks connect as clients)."""
    return _loopback_store(topology.world_size)


_LOCAL_WORKERS: LocalWorkers | None = None


def local_workers() -> LocalWorkers | None:
    """The score workers this process's launcher started (``launch(survive_workers=True)``, rank 0 running
    here); None otherwise (an external torchrun, or a rank process)."""
    return _LOCAL_WORKERS


def _loopback_store(world_size: int) -> dist.TCPStore:
    """The world's TCPStore, listening on 127.0.0.1 only (every rank of ``launch`` is on this machine).

    ``TCPStore(host, 0, is_master=True)`` does not bind ``host``: its server listens on every interface
    (``*:port``), which put an unauthenticated key-value store (rank registry, heartbeats, process-group
    rendezvous) on the network even for ``serve --host 127.0.0.1``. So the socket is bound here and handed
    over (``master_listen_fd``; the store owns and closes it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return dist.TCPStore("127.0.0.1", port, world_size=world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=60), wait_for_workers=False,
                         master_listen_fd=sock.detach())


def _rank_environment(topology: Topology, port: int, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    python_path = [str(_REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(
        PYTHONPATH=os.pathsep.join(python_path),
        WORLD_SIZE=str(topology.world_size),
        LOCAL_WORLD_SIZE=str(topology.world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        **{_LAUNCHER_PID_ENV: str(os.getpid())},
    )
    # As torchrun does: N ranks each using every core oversubscribe the machine; ranks opt back in.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _watch(ranks: list[_Rank]) -> _Rank | None:
    """Wait until all ranks exit 0 (-> None) or one fails (-> the root-cause rank)."""
    while True:
        newly_failed = []
        for r in ranks:
            if r.exit_code is None and (code := r.proc.poll()) is not None:
                r.exit_code = code
                if code != 0:
                    newly_failed.append(r)
        if newly_failed:
            primary = [r for r in newly_failed if r.exit_code != EXIT_PEER_LOST]
            return (primary or newly_failed)[0]
        if all(r.exit_code == 0 for r in ranks):
            return None
        time.sleep(_POLL_S)


def _settle(ranks: list[_Rank], settle_s: float) -> None:
    """Give the surviving ranks ``settle_s`` seconds to exit by themselves."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(r.proc.poll() is None for r in ranks):
        time.sleep(_POLL_S)


def _stop_all(ranks: list[_Rank], grace_s: float) -> None:
    """SIGTERM every live rank's process group, SIGKILL what is left after ``grace_s``, reap all."""
    alive = [r for r in ranks if r.proc.poll() is None]
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for r in alive:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
    for r in ranks:
        r.proc.wait()
        # A rank may have left helpers in its process group; they go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.proc.pid, signal.SIGKILL)


def _forward_signals_to(ranks: list[_Rank]) -> dict[int, object]:
    """Turn SIGINT/SIGTERM on the launcher into an orderly stop of the ranks (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"launcher received {signal.Signals(signum).name}")

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


# ---- the rank side --------------------------------------------------------------------------------


def init_rank(topology: Topology, timeout_s: float = 300.0) -> tuple[int, ProcessGroups]:
    """Join the world from the ``env://`` variables and build the groups; returns (global rank, groups).

    On CUDA the device is ``LOCAL_RANK`` and is set before ``init_process_group`` (NCCL needs it); the
    default group is ``cpu:gloo,cuda:nccl`` so CPU-side collectives also work on it. ``timeout_s`` bounds
    the rendezvous and every collective of the default and ``data`` groups; ``control`` waits longer (idle
    workers), with bounded waits done by ``proto.liveness.wait_with_timeout``.
    """
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"init_rank: {var} is not set; start the ranks with server.launcher.launch "
                               "or torchrun")
    world = int(os.environ["WORLD_SIZE"])
    if world != topology.world_size:
        raise RuntimeError(f"the launcher started {world} ranks but topology {topology.name!r} needs "
                           f"{topology.world_size}; give torchrun {topology.world_size} processes in total")
    if topology.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=topology.default_backend, init_method="env://", timeout=timeout)
    groups = topology.build_groups(data_timeout=timeout)
    return dist.get_rank(), groups


def shutdown() -> None:
    """Leave the world: destroy every process group (no barrier, so a dead peer cannot make it hang)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_store() -> dist.Store:
    """The world's key-value store (for ``proto.liveness.Heartbeat``); needs torch.distributed initialised."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _die_with_launcher() -> None:
    """Ask the kernel to SIGKILL this rank when its launcher dies, so no rank outlives it (Linux)."""
    launcher_pid = os.environ.get(_LAUNCHER_PID_ENV)
    if launcher_pid is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(launcher_pid):  # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def _resolve(entry: str) -> Callable[[list[str]], int | None]:
    module_name, _, function = entry.partition(":")
    fn = getattr(importlib.import_module(module_name), function, None)
    if not callable(fn):
        raise ValueError(f"entry {entry!r}: {module_name} has no function {function!r}")
    return fn


def _rank_main(argv: list[str]) -> int:
    """``python -m server.launcher ENTRY ARGS…``: run one rank, dying with the launcher."""
    _die_with_launcher()
    entry, *args = argv
    return _call_entry(entry, args)


def _call_entry(entry: str, args: list[str]) -> int:
    """Run ``entry(args)`` as this process's rank; map a lost peer to ``EXIT_PEER_LOST``."""
    try:
        code = _resolve(entry)(args)
    except PeerError as exc:
        print(f"{_MESSAGE_PREFIX}: rank {os.environ.get('RANK')}: {exc}", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    except RuntimeError as exc:
        if "Connection closed by peer" in str(exc) or "Connection reset by peer" in str(exc):
            print(f"{_MESSAGE_PREFIX}: rank {os.environ.get('RANK')} lost a peer: {exc}", file=sys.stderr,
                  flush=True)
            return EXIT_PEER_LOST
        raise
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))

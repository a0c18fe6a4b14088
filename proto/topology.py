"""The shape of one serving group: which rank does what, and the process groups they talk on.

A serving group is one torch.distributed world. Rank 0 is always the master (front-ends, VAE decode,
publishing). The score workers form one Ulysses sequence-parallel (SP) group of ``score_workers`` ranks:

- ``decoder="dedicated"``: world = 1 master + N workers, workers are ranks 1..N (disaggregated);
- ``decoder="colocated"``: world = N ranks, rank 0 is master, SP leader and decoder (self-contained).

The paper's four TTBC topologies are the four corners:

======================  ===============  =========  ==========
topology                score_workers    decoder    world size
======================  ===============  =========  ==========
self-contained 1        1                colocated  1
self-contained N (SP)   N                colocated  N
disaggregated 1+1       1                dedicated  2
disaggregated N+1       N                dedicated  N + 1
======================  ===============  =========  ==========

Three process groups (torchtitan's ParallelDims idea: declared once here, handed to model code, never
created by it):

- ``control``: gloo, all ranks. Small headers (session open/close, chunk headers, shutdown). It is on CPU so
  that idle waits for the next message never sit inside NCCL and trip its watchdog.
- ``data``: all ranks; NCCL on CUDA, gloo on CPU. Master <-> worker tensors (chunk inputs, latents).
- ``sp``: the score workers only; NCCL on CUDA, gloo on CPU. Ulysses all-to-all. ``None`` on the master
  when the decoder is dedicated.

Separate groups let their traffic overlap (NCCL serialises ops on one communicator).

A fifth topology, step-pipeline parallelism (``step_stages`` = S > 1, ``--step-pipeline``; LiveAct's
timestep-forcing pipeline): S stages of ``score_workers`` ranks each, stage s running denoising step s of
every chunk on its own per-step KV cache slot and handing the re-noised latent to stage s + 1; the last stage
returns x0 to the master. The decoder must be dedicated: world = 1 + S × N, stage s on ranks
1 + s·N … 1 + (s + 1)·N − 1, each stage one SP group (``sp`` is this rank's stage's group), the last stage's
SP leader the one that sends the latent (``sp_leader``). ``workers.step_stage`` has the data flow.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

DecoderPlacement = Literal["dedicated", "colocated"]
DeviceType = Literal["cpu", "cuda"]

MASTER_RANK = 0

# Idle workers wait on `control` for the next session for as long as the server lives; bounded waits
# (the master waiting for a result) use proto.wire.wait_with_timeout instead of the group timeout.
CONTROL_TIMEOUT = datetime.timedelta(days=7)


def head_divisors(num_heads: int) -> list[int]:
    """Every SP degree that splits ``num_heads`` evenly, ascending."""
    return [p for p in range(1, num_heads + 1) if num_heads % p == 0]


def check_heads_divisible(num_heads: int, sp_degree: int, preset: str | None = None) -> None:
    """Raise ``ValueError`` unless Ulysses can split ``num_heads`` heads over ``sp_degree`` ranks."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be at least 1, got {num_heads}")
    if sp_degree < 1:
        raise ValueError(f"--score-workers must be at least 1, got {sp_degree}")
    if num_heads % sp_degree != 0:
        which = f"the preset {preset!r}" if preset else "the preset"
        choices = ", ".join(str(p) for p in head_divisors(num_heads))
        raise ValueError(
            f"{which} has {num_heads} heads; --score-workers {sp_degree} does not divide them "
            f"(Ulysses gives each worker num_heads / N whole heads); use one of {choices}"
        )


@dataclass(frozen=True)
class Topology:
    """One serving group. Validated on construction; all rank arithmetic lives here.

    Args:
        score_workers: N, the number of score-worker ranks = the SP degree.
        decoder: ``"dedicated"`` (a master rank that only decodes) or ``"colocated"`` (rank 0 decodes too).
        device: ``"cpu"`` (gloo everywhere) or ``"cuda"`` (one GPU per rank, NCCL for data and sp).
        num_heads: the DiT's attention heads; when given, N must divide it.
        preset: the preset name, only used in error messages.
        step_stages: S, step-pipeline stages (``--step-pipeline``: one per denoising step); 1 = none. Each
            stage is an SP group of ``score_workers`` ranks; needs ``decoder="dedicated"``.
    """

    score_workers: int = 1
    decoder: DecoderPlacement = "dedicated"
    device: DeviceType = "cpu"
    num_heads: int | None = None
    preset: str | None = None
    step_stages: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.score_workers, int) or self.score_workers < 1:
            raise ValueError(f"--score-workers must be a positive integer, got {self.score_workers!r}")
        if self.decoder not in ("dedicated", "colocated"):
            raise ValueError(f"--decoder must be 'dedicated' or 'colocated', got {self.decoder!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.num_heads is not None:
            check_heads_divisible(self.num_heads, self.score_workers, self.preset)
        if not isinstance(self.step_stages, int) or self.step_stages < 1:
            raise ValueError(f"step_stages must be a positive integer, got {self.step_stages!r}")
        if self.step_stages > 1 and self.decoder != "dedicated":
            # A colocated master would run stage 0 inline: its decode would stall the pipeline's first stage
            # (and rank 0 would hold a stage's cache besides the VAE), which is what the pipeline removes.
            raise ValueError(
                f"--step-pipeline ({self.step_stages} stages) needs --decoder dedicated: the master only "
                "decodes while the stages denoise; a colocated master is not supported"
            )

    # ---- ranks -------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.score_workers * self.step_stages + (1 if self.decoder == "dedicated" else 0)

    @property
    def master_rank(self) -> int:
        return MASTER_RANK

    @property
    def worker_ranks(self) -> tuple[int, ...]:
        """Global ranks of the score workers, in SP order (the first one is the SP leader); with step stages,
        every stage's ranks, stage by stage."""
        first = 1 if self.decoder == "dedicated" else 0
        return tuple(range(first, first + self.score_workers * self.step_stages))

    @property
    def step_pipeline(self) -> bool:
        """True for the step-pipeline topology (``step_stages`` > 1)."""
        return self.step_stages > 1

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        """Global ranks of step stage ``stage`` (0-based), in SP order: its SP group."""
        if not 0 <= stage < self.step_stages:
            raise ValueError(f"stage {stage} is outside {self.name!r} (stages 0..{self.step_stages - 1})")
        first = self.worker_ranks[0] + stage * self.score_workers
        return tuple(range(first, first + self.score_workers))

    def stage_of(self, rank: int) -> int | None:
        """The step stage of score worker ``rank`` (0 without step stages); None for a dedicated master."""
        if not self.is_worker(rank):
            return None
        return (rank - self.worker_ranks[0]) // self.score_workers

    @property
    def sp_degree(self) -> int:
        return self.score_workers

    @property
    def sp_leader(self) -> int:
        """The worker that holds the gathered clean latent and sends it to the master (with step stages: the
        last stage's SP leader)."""
        return self.stage_ranks(self.step_stages - 1)[0]

    @property
    def disaggregated(self) -> bool:
        """True when the master does not denoise, so latents travel from the SP leader to the master."""
        return self.decoder == "dedicated"

    @property
    def name(self) -> str:
        """The paper's name for this topology, e.g. ``"disaggregated 2+1"``; ``"step-pipeline 2x1+1"`` for
        2 stages of 1 rank and a dedicated master."""
        if self.step_pipeline:
            return f"step-pipeline {self.step_stages}x{self.score_workers}+1"
        if self.disaggregated:
            return f"disaggregated {self.score_workers}+1"
        if self.score_workers == 1:
            return "self-contained 1"
        return f"self-contained {self.score_workers} (SP)"

    def is_worker(self, rank: int) -> bool:
        return rank in self.worker_ranks

    def role(self, rank: int) -> str:
        """A human name for ``rank``, for logs and errors: ``"master"``, ``"score worker 2 (SP leader)"``…"""
        self._check_rank(rank)
        parts = []
        if rank == self.master_rank:
            parts.append("master")
        if self.is_worker(rank) and self.step_pipeline:
            stage = self.stage_of(rank)
            assert stage is not None
            sp_rank = self.stage_ranks(stage).index(rank)
            leader = " (SP leader)" if sp_rank == 0 and self.score_workers > 1 else ""
            parts.append(f"step stage {stage} score worker {sp_rank}{leader}")
        elif self.is_worker(rank):
            sp_rank = self.worker_ranks.index(rank)
            parts.append(f"score worker {sp_rank}" + (" (SP leader)" if rank == self.sp_leader else ""))
        return " + ".join(parts)

    # ---- backends ----------------------------------------------------------------------------------

    @property
    def control_backend(self) -> str:
        return "gloo"

    @property
    def data_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def default_backend(self) -> str:
        """Backend for ``init_process_group``: CPU tensors always work on it, CUDA tensors use NCCL."""
        return "cpu:gloo,cuda:nccl" if self.device == "cuda" else "gloo"

    # ---- groups ------------------------------------------------------------------------------------

    def build_groups(self, data_timeout: datetime.timedelta | None = None) -> ProcessGroups:
        """Create the ``control``, ``data`` and ``sp`` groups. Collective: every rank must call it, once.

        ``torch.distributed`` must already be initialised with ``world_size`` ranks (see
        ``server.launcher.init_rank``). ``data_timeout`` defaults to the default group's timeout.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "Topology.build_groups needs torch.distributed initialised first "
                "(call server.launcher.init_rank)"
            )
        world = dist.get_world_size()
        if world != self.world_size:
            raise RuntimeError(
                f"the world has {world} ranks but topology {self.name!r} needs {self.world_size} "
                f"({self.score_workers} score workers, decoder {self.decoder}); launch it with "
                f"--nproc-per-node/--nnodes giving {self.world_size} ranks in total"
            )
        rank = dist.get_rank()
        everyone = list(range(self.world_size))
        # new_group is collective over the default group: identical calls in identical order on every
        # rank, members or not.
        control = dist.new_group(everyone, backend=self.control_backend, timeout=CONTROL_TIMEOUT)
        data = dist.new_group(everyone, backend=self.data_backend, timeout=data_timeout)
        if not self.step_pipeline:
            sp = dist.new_group(list(self.worker_ranks), backend=self.data_backend, timeout=data_timeout)
            return ProcessGroups(
                topology=self,
                rank=rank,
                control=control,
                data=data,
                sp=sp if self.is_worker(rank) else None,
            )
        # One SP group per stage, every rank creating all of them in the same order.
        stage_groups = [
            dist.new_group(list(self.stage_ranks(s)), backend=self.data_backend, timeout=data_timeout)
            for s in range(self.step_stages)
        ]
        stage = self.stage_of(rank)
        return ProcessGroups(
            topology=self,
            rank=rank,
            control=control,
            data=data,
            sp=None if stage is None else stage_groups[stage],
        )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside {self.name!r} (ranks 0..{self.world_size - 1})")


@dataclass(frozen=True)
class ProcessGroups:
    """The groups one rank uses, built by ``Topology.build_groups``. Answers "which group do I use"."""

    topology: Topology
    rank: int
    control: dist.ProcessGroup
    data: dist.ProcessGroup
    sp: dist.ProcessGroup | None

    @property
    def is_master(self) -> bool:
        return self.rank == self.topology.master_rank

    @property
    def is_worker(self) -> bool:
        return self.topology.is_worker(self.rank)

    @property
    def is_sp_leader(self) -> bool:
        return self.rank == self.topology.sp_leader

    @property
    def sp_rank(self) -> int | None:
        """This rank's index in the SP group (0 = leader), ``None`` on a dedicated master."""
        stage = self.topology.stage_of(self.rank)
        return None if stage is None else self.topology.stage_ranks(stage).index(self.rank)

    @property
    def stage(self) -> int | None:
        """This rank's step stage (0 without step stages), ``None`` on a dedicated master."""
        return self.topology.stage_of(self.rank)

    @property
    def role(self) -> str:
        return self.topology.role(self.rank)

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live: its current CUDA device, or the CPU."""
        if self.topology.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

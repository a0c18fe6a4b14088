"""Topology: rank layout of the four paper topologies, validation errors, and the groups it builds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_world import run_world

from proto.topology import Topology

FOUR = {
    "self-contained 1": (Topology(1, "colocated"), 1, 0, (0,)),
    "self-contained 2 (SP)": (Topology(2, "colocated"), 2, 0, (0, 1)),
    "disaggregated 1+1": (Topology(1, "dedicated"), 2, 0, (1,)),
    "disaggregated 2+1": (Topology(2, "dedicated"), 3, 0, (1, 2)),
}


@pytest.mark.parametrize("name", list(FOUR))
def test_four_topologies_have_the_papers_rank_layout(name: str) -> None:
    topo, world, master, workers = FOUR[name]
    assert topo.name == name
    assert (topo.world_size, topo.master_rank, topo.worker_ranks) == (world, master, workers)
    assert topo.sp_leader == workers[0]
    assert topo.disaggregated == name.startswith("disaggregated")


def test_heads_that_do_not_split_name_the_valid_worker_counts() -> None:
    with pytest.raises(ValueError) as err:
        Topology(3, "dedicated", num_heads=40, preset="wan2.1-i2v-14b")
    message = str(err.value)
    assert "40 heads" in message and "--score-workers 3" in message
    assert "1, 2, 4, 5, 8, 10, 20, 40" in message


def test_heads_that_split_are_accepted() -> None:
    assert Topology(5, "dedicated", num_heads=40).sp_degree == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"score_workers": 0}, "--score-workers"),
        ({"decoder": "shared"}, "--decoder"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_fields_are_rejected_with_the_option_name(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Topology(**kwargs)


def test_roles_name_master_leader_and_workers() -> None:
    topo = Topology(2, "colocated")
    assert topo.role(0) == "master + score worker 0 (SP leader)"
    assert topo.role(1) == "score worker 1"
    assert Topology(2, "dedicated").role(0) == "master"
    with pytest.raises(ValueError, match="rank 3"):
        topo.role(3)


def test_backends_are_gloo_on_cpu_and_nccl_for_tensors_on_cuda() -> None:
    cpu, cuda = Topology(2, device="cpu"), Topology(2, device="cuda")
    assert (cpu.control_backend, cpu.data_backend, cpu.default_backend) == ("gloo", "gloo", "gloo")
    assert (cuda.control_backend, cuda.data_backend) == ("gloo", "nccl")
    assert cuda.default_backend == "cpu:gloo,cuda:nccl"


def _check_groups(rank: int, world: int, name: str) -> None:
    topo, _, _, workers = FOUR[name]
    groups = topo.build_groups()
    assert groups.rank == rank
    assert groups.is_master == (rank == 0)
    assert groups.is_worker == (rank in workers)
    assert groups.is_sp_leader == (rank == workers[0])
    assert dist.get_world_size(groups.control) == world
    assert dist.get_world_size(groups.data) == world
    # Every rank contributes its rank + 1: control/data see everyone, sp only the workers.
    everyone = sum(r + 1 for r in range(world))
    for group in (groups.control, groups.data):
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=group)
        assert t.item() == everyone
    if rank in workers:
        assert groups.sp is not None and groups.sp_rank == workers.index(rank)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=groups.sp)
        assert t.item() == sum(r + 1 for r in workers)
    else:
        assert groups.sp is None and groups.sp_rank is None


@pytest.mark.parametrize("name", list(FOUR))
def test_build_groups_gives_each_rank_its_groups(name: str, tmp_path) -> None:
    run_world(_check_groups, FOUR[name][1], tmp_path, name)


def _build_with_wrong_world(rank: int, world: int) -> None:
    with pytest.raises(RuntimeError, match="needs 3"):
        Topology(2, "dedicated").build_groups()


def test_build_groups_rejects_a_world_of_the_wrong_size(tmp_path) -> None:
    run_world(_build_with_wrong_world, 1, tmp_path)

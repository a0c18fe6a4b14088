"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a 2-D device mesh, i.e. HSDP, plus activation
checkpointing on the DiT blocks; the same code runs under `torchrun` on GPUs (NCCL) and on CPU (gloo).

Mesh `(replicate, shard)`: parameters, gradients and optimiser states are sharded over the `shard` dim (a
node's GPUs) and replicated over `replicate` (across nodes), so the per-step all-gathers and
reduce-scatters stay inside a node and only a gradient all-reduce crosses nodes (the paper's §5.3 HSDP).
`replicate × shard` must equal the world size; (1, world) is plain FSDP, (world, 1) plain DDP.

Every DiT block is its own FSDP unit (its parameters are gathered just before its forward and freed after),
the root unit holds the embeddings and the head. Activation checkpointing uses the composable
`torch.distributed._composable.checkpoint`, which keeps parameter names, so state dicts stay in Wan's layout
and `workers.checkpoint.save_dit_checkpoint` works on `full_state_dict(model)`.

Data parallelism: each rank trains on its slice of the global batch (`rank_slice`); FSDP averages gradients
over all ranks, so a step equals a single-process step on the whole batch (tests/training/test_fsdp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from workers.model import WanAttentionBlock

MESH_DIMS = ("replicate", "shard")


@dataclass(frozen=True)
class FSDPConfig:
    """How a model is sharded.

    replicate, shard: the HSDP mesh shape; None for `shard` = world // replicate (one node's GPUs).
    activation_checkpointing: recompute each DiT block's activations in the backward pass.
    mixed_precision: 'bf16' computes in bfloat16 with float32 master weights and float32 gradient
        reduction; 'fp32' computes in float32 (CPU tests).
    """

    replicate: int = 1
    shard: int | None = None
    activation_checkpointing: bool = True
    mixed_precision: Literal["fp32", "bf16"] = "fp32"

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        if self.replicate < 1 or world_size % self.replicate:
            raise ValueError(
                f"FSDPConfig.replicate={self.replicate} must divide the world size {world_size}"
            )
        shard = self.shard if self.shard is not None else world_size // self.replicate
        if self.replicate * shard != world_size:
            raise ValueError(
                f"HSDP mesh {self.replicate} x {shard} does not cover the {world_size} ranks; "
                "set replicate x shard = world size"
            )
        return self.replicate, shard


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_mesh(config: FSDPConfig, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D (replicate, shard) mesh over all ranks of the default process group."""
    _, size = world()
    return init_device_mesh(device_type, config.mesh_shape(size), mesh_dim_names=MESH_DIMS)


def shard_model(model: nn.Module, mesh: DeviceMesh, config: FSDPConfig) -> nn.Module:
    """Apply activation checkpointing and FSDP2 to a WanModel in place (blocks first, then the root).

    Returns the same module, now holding DTensor parameters sharded over `mesh`.
    """
    policy = MixedPrecisionPolicy()
    if config.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, WanAttentionBlock):
            if config.activation_checkpointing:
                checkpoint(module)
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, on rank 0 (others get {}); collective: every rank must call it."""
    if world()[1] == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rank_slice(batch_size: int) -> slice:
    """This rank's contiguous share of a global batch (the batch must divide evenly)."""
    rank, size = world()
    if batch_size % size:
        raise ValueError(f"global batch {batch_size} does not split evenly over {size} ranks")
    per = batch_size // size
    return slice(rank * per, (rank + 1) * per)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce average of a scalar (a loss for logging); identity without a process group."""
    if world()[1] == 1:
        return value.detach()
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / world()[1]


def grad_norm(model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients (over all shards), clipped to `max_norm` when given."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm

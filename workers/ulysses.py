"""Process-group helpers of sequence parallelism (``workers.sp`` holds the band layout and its all-to-alls):
a ``group`` of ``None`` or size 1 is one rank, so one code path serves the self-contained single worker."""

from __future__ import annotations

import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)

"""What crosses a worker pool's result pipe.

torch registers its own pickling for tensors with multiprocessing: a tensor sent from a worker travels as a
file descriptor of shared memory that the pool's result thread, in the parent, fetches from that worker while
unpickling. A worker that has already exited (workers exit as the pool terminates, with results still in the
pipe) cannot hand it over: the fetch fails, the result thread ends silently, and `terminate()` raises "Cannot
have cache with result_hander not alive". Results therefore cross as numpy arrays, whose bytes travel in the
pipe, and become tensors again on this side; the values are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def as_arrays(tensors: Mapping[str, torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
    """A dict or tuple of CPU tensors as the same structure of numpy arrays (for the pipe)."""
    if isinstance(tensors, Mapping):
        return {key: value.numpy() for key, value in tensors.items()}
    return tuple(value.numpy() for value in tensors)


def as_tensors(arrays: Mapping[str, np.ndarray] | tuple[np.ndarray, ...]) -> Any:
    """The inverse of `as_arrays`."""
    if isinstance(arrays, Mapping):
        return {key: torch.from_numpy(value) for key, value in arrays.items()}
    return tuple(torch.from_numpy(value) for value in arrays)

"""Host -> device copies through reused pinned buffers, for the tensors a rank builds on the host per chunk.

A chunk's noise is drawn on the CPU (``proto.chunk_specs.chunk_noise``: identical on every rank and
machine), its speaking flags come as Python lists, and a self-contained master's audio features come from
the CPU front-end. ``tensor.to("cuda")`` from pageable memory is a synchronous copy that also stalls the
host until the GPU has drained everything queued before it; from pinned memory it is an asynchronous DMA
on the current stream. ``HostStaging.to_device(name, host)`` copies ``host`` into a pinned buffer kept per
``name`` (reallocated only when the shape or dtype changes) and issues a non-blocking copy from it.

Reuse is safe: before a buffer is overwritten, the host waits on the event recorded after that buffer's
previous copy — one chunk ago, long finished in steady state — never on the whole device. On a CPU device
``to_device`` is ``host.to(device)`` (a no-op for CPU tensors), so the same code runs everywhere.
"""

from __future__ import annotations

import torch


class HostStaging:
    """Pinned staging buffers, one per name, for one device (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    @property
    def pinned(self) -> bool:
        """Whether copies go through pinned buffers (CUDA devices only)."""
        return self.device.type == "cuda"

    def to_device(self, name: str, host: torch.Tensor) -> torch.Tensor:
        """``host`` on this stage's device; from the CPU through the pinned buffer ``name`` on CUDA.

        The result is ordered on the current CUDA stream like any kernel issued there, so consumers on
        that stream need no synchronisation; ``host`` may be changed as soon as this returns."""
        if not self.pinned or host.device.type != "cpu":
            return host.to(self.device)
        slot = self._buffers.get(name)
        if slot is None or slot[0].shape != host.shape or slot[0].dtype != host.dtype:
            buffer = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        else:
            buffer, copied = slot
            if copied is not None:
                copied.synchronize()  # only this buffer's previous copy, not the device
        buffer.copy_(host)
        out = buffer.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[name] = (buffer, event)
        return out

    def tensor(self, name: str, data: object, dtype: torch.dtype) -> torch.Tensor:
        """``torch.tensor(data, dtype=dtype)`` (e.g. a list of flags) on the device via ``to_device``."""
        return self.to_device(name, torch.tensor(data, dtype=dtype))

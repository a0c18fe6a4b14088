"""CUDA graphs of the streaming DiT's score passes (`--cuda-graphs`).

A streaming pass (`StreamingDiT._forward`: one `WanModel.forward_step` over a chunk) has static shapes per
session plan: the chunk's latent shape, the cache slot, the write offset and the visible length take a few
values (chunks 0 and 1, then two alternating steady-state offsets in the sparse-causal window; chunk 0 and
the later chunks in the ConvKV window), and no host sync happens inside it. `StepGraphs` captures each
distinct pass once and replays it:

- a pass is keyed by what its graph bakes in: the engine's non-tensor arguments (offsets, flags), the
  shape/dtype/layout of every per-pass input, and the *address* of every tensor the pass reads or writes
  in place by reference (the session's KV-cache slot, cross-attention K/V and time embeddings, which stay
  put for the session's life — a new session is a new key);
- per-pass inputs that change from call to call (the latent x, the chunk's I2V conditioning, RoPE table,
  audio K/V, face mask) are copied into static buffers before each replay (a few MB; the cross-attention
  K/V, hundreds of MB at 18B, are read in place instead);
- the first `warmup` calls of a key run eager (on `--compile` these compile the blocks); the next call
  warms up once more on the capture stream (cuBLAS/cuDNN workspaces of that stream), captures, and replays;
  every later call copies its inputs and replays. The graph writes the chunk's keys/values into the cache
  at the captured addresses, exactly as the eager pass would;
- the output buffer is cloned after replay (the sampler keeps it while another graph runs);
- all graphs share one memory pool (each graph's intermediates are dead when it returns, so the pool holds
  the largest pass's working set, not their sum); a session's graphs are dropped when it closes
  (`drop(owner)`), and at most `max_graphs` are kept (least recently used dropped first).

With `--compile` the graph is captured manually (`torch.cuda.CUDAGraph`) around the compiled blocks rather
than with inductor's `mode="reduce-overhead"`: inductor's CUDA-graph trees skip any graph that mutates an
input, and every block writes the KV cache in place, so "reduce-overhead" would silently run those blocks
without graphs; one manual graph per pass also replays the whole pass (blocks, head, the Python between
them) in one launch instead of one per block.

Where capture cannot work: on a CPU device `--cuda-graphs` is refused at start-up (`check_cuda_graphs`; a
production user who asks for graphs and silently gets eager would misread every timing), as is sequence
parallelism (a collective captured on one rank but not on another hangs the group). On CUDA a capture that
raises is logged once and the engine runs eager from then on (the pass result is the eager one).

Unmeasured on a GPU (no device was available when this was written): `benchmarks/forward_speed.py` has the
`graphs` and `compiled+graphs` variants that measure it; the bookkeeping is tested on CPU with a fake
capture (tests/workers/test_cuda_graphs.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


def check_cuda_graphs(device: str | torch.device, score_workers: int = 1) -> None:
    """Refuse `--cuda-graphs` where it cannot run: ValueError naming the fix."""
    device_type = torch.device(device).type
    if device_type != "cuda":
        raise ValueError(
            f"--cuda-graphs captures CUDA graphs and needs --device cuda (the device is {device_type}); "
            "leave out --cuda-graphs on this device"
        )
    if score_workers > 1:
        raise ValueError(
            f"--cuda-graphs supports one score worker for now (got --score-workers {score_workers}): the "
            "Ulysses all-to-alls inside a pass are not captured; use --score-workers 1 or leave out "
            "--cuda-graphs"
        )


class Capture(Protocol):
    """Records `fn` (which reads only the static buffers it is given) as a graph: returns (replay, output),
    `output` the buffer replay rewrites. `torch.cuda.CUDAGraph` in production; a fake in tests."""

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...


class CudaGraphCapture:
    """`Capture` by `torch.cuda.CUDAGraph` on a side stream, all graphs in one shared memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):  # warm the capture stream's workspaces (PyTorch's recipe)
            fn()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a colocated rank decodes on another thread meanwhile; only this thread's
        # capture-unsafe calls may fail the capture ("global" would fail the decoder's too).
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            output = fn()
        return graph.replay, output


@dataclass
class _Entry:
    """One key's state: eager calls so far, then the captured graph and its static input buffers."""

    owner: int
    calls: int = 0
    replay: Callable[[], None] | None = None
    buffers: list[torch.Tensor | None] | None = None
    output: torch.Tensor | None = None


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class StepGraphs:
    """Per-key CUDA graphs of a function of tensors (module docstring). Not thread-safe (one engine thread).

    Args:
        capture: records a graph (`CudaGraphCapture` on CUDA; tests pass a fake).
        warmup: eager calls of a key before it is captured (>= 1: the first call may compile or lazily
            initialise, which cannot happen inside a capture).
        max_graphs: graphs kept at most; the least recently used is dropped first.
    """

    def __init__(self, capture: Capture, warmup: int = 1, max_graphs: int = 64) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 eager call before capture, got {warmup}")
        self.capture = capture
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.disabled_reason: str | None = None
        self.captures = 0  # graphs captured so far
        self.replays = 0  # passes served by a replay

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def run(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: Sequence[Any],
        *,
        by_reference: Sequence[torch.Tensor] = (),
        key: Hashable = (),
        owner: object = None,
    ) -> torch.Tensor:
        """`fn(*inputs)`, eager or from the graph of this call's key.

        inputs: a pytree (tuples, lists, dicts, None) of the tensors that change between calls; a graph
            reads copies of them in static buffers. by_reference: tensors `fn` reads or writes where they
            are (closed over by `fn`); their addresses are part of the key. key: `fn`'s other arguments
            that a graph bakes in (ints, flags). owner: the session these graphs belong to (`drop`).
        """
        if not self.enabled:
            return fn(*inputs)
        leaves, spec = pytree.tree_flatten(list(inputs))
        full_key = (
            key,
            spec,
            tuple(_meta(t) if isinstance(t, torch.Tensor) else t for t in leaves),
            tuple((t.data_ptr(), *_meta(t)) for t in by_reference),
        )
        entry = self.entries.get(full_key)
        if entry is None:
            entry = self.entries[full_key] = _Entry(owner=id(owner))
            while len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        self.entries.move_to_end(full_key)
        entry.calls += 1
        if entry.replay is None and entry.calls <= self.warmup:
            return fn(*inputs)
        if entry.replay is None:
            buffers = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
            static = pytree.tree_unflatten(buffers, spec)
            try:
                entry.replay, entry.output = self.capture(lambda: fn(*static))
            except Exception as exc:  # any capture failure: eager from now on, logged once
                self.disabled_reason = f"{type(exc).__name__}: {exc}"
                self.entries.clear()
                log.warning("CUDA graph capture failed (%s); the score passes run eager from now on", exc)
                return fn(*inputs)
            entry.buffers = buffers
            self.captures += 1
        else:
            assert entry.buffers is not None
            for buffer, value in zip(entry.buffers, leaves, strict=True):
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(value)
        entry.replay()
        self.replays += 1
        assert entry.output is not None
        return entry.output.clone()

    def drop(self, owner: object) -> None:
        """Forget the graphs of `owner` (a closed session): its addresses may be reused by anything."""
        for key in [k for k, e in self.entries.items() if e.owner == id(owner)]:
            del self.entries[key]

    def stats(self) -> dict[str, Any]:
        """Graphs held, captured and replayed, and why capture is off (None while it is on)."""
        return {
            "graphs": sum(1 for e in self.entries.values() if e.replay is not None),
            "captures": self.captures,
            "replays": self.replays,
            "disabled": self.disabled_reason,
        }


def step_graphs_for(device: torch.device, warmup: int = 1) -> StepGraphs:
    """The engine's `StepGraphs` on a CUDA `device` (ValueError on another device)."""
    check_cuda_graphs(device)
    return StepGraphs(CudaGraphCapture(device), warmup=warmup)

"""proto.staging.HostStaging: host tensors reach the device unchanged, via pinned buffers on CUDA."""

from __future__ import annotations

import pytest
import torch

from proto.chunk_specs import chunk_noise
from proto.staging import HostStaging


def test_on_a_cpu_device_it_passes_tensors_through_without_pinning() -> None:
    staging = HostStaging("cpu")
    noise = chunk_noise(7, 2, (16, 3, 4, 4))
    out = staging.to_device("noise", noise)
    assert not staging.pinned
    assert out is noise  # .to(cpu) of a CPU tensor: no copy at all
    flags = staging.tensor("speaking", [[True, False, True]], torch.bool)
    assert flags.dtype == torch.bool and flags.tolist() == [[True, False, True]]


@pytest.mark.gpu
def test_on_cuda_each_copy_equals_its_source_while_the_buffer_is_reused() -> None:
    staging = HostStaging("cuda")
    outs, sources = [], []
    for seed in range(4):  # one buffer, four chunks: a rewrite must not change an earlier copy
        noise = chunk_noise(seed, 2, (16, 3, 8, 8))
        sources.append(noise.clone())
        outs.append(staging.to_device("noise", noise))
        noise.zero_()  # the caller may reuse its host tensor at once
    torch.cuda.synchronize()
    for out, source in zip(outs, sources, strict=True):
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), source)
    buffer, _event = staging._buffers["noise"]
    assert buffer.is_pinned()
    staging.to_device("noise", torch.zeros(2, 16, 3, 4, 4))  # another shape: a new buffer
    assert staging._buffers["noise"][0].shape == (2, 16, 3, 4, 4)

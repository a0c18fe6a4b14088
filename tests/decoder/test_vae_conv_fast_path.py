"""CausalConv3d's CPU fast path (one Conv2d over stacked time windows) computes the same convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decoder.feature_cache import FeatureCache
from decoder.vae import CausalConv3d, build_vae
from proto.vae_config import get_vae_preset

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

# (in, out, kernel, stride, padding): every CausalConv3d shape the Wan VAE uses, with odd sizes around them.
LAYERS = [
    (5, 7, 3, 1, 1),  # residual convolutions, conv1, head
    (6, 12, (3, 1, 1), 1, (1, 0, 0)),  # upsample3d time_conv
    (6, 6, (3, 1, 1), (2, 1, 1), 0),  # downsample3d time_conv (time stride 2)
    (4, 9, 1, 1, 0),  # shortcut, WanVAE.conv1 / conv2
    (3, 4, (2, 3, 1), (1, 2, 1), (1, 1, 0)),  # uneven kernel and spatial stride
]


def _conv(layer: tuple) -> CausalConv3d:
    torch.manual_seed(0)
    return CausalConv3d(*layer[:2], kernel_size=layer[2], stride=layer[3], padding=layer[4]).eval()


def _reference(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's Conv3d on the causally padded input, as before the fast path."""
    return nn.Conv3d.forward(conv, nn.functional.pad(x, (0, 0, 0, 0, conv.time_pad, 0)))


@pytest.mark.parametrize("layer", LAYERS)
def test_cpu_float32_fast_path_equals_conv3d(layer: tuple) -> None:
    conv = _conv(layer)
    x = torch.randn(2, layer[0], 7, 10, 9, generator=torch.Generator().manual_seed(1))
    assert conv._uses_conv2d(x)
    with torch.no_grad():
        out, expected = conv(x), _reference(conv, x)
    assert out.shape == expected.shape
    assert out.is_contiguous()
    assert (out - expected).abs().max().item() <= 1e-5


def test_fast_path_with_a_feature_cache_equals_conv3d_over_the_whole_input() -> None:
    conv = _conv(LAYERS[0])
    x = torch.randn(1, 5, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    cache = FeatureCache()
    pieces = []
    with torch.no_grad():
        for piece in x.split(2, dim=2):
            cache.begin_step()
            pieces.append(conv(piece, cache))
            cache.end_step()
        expected = _reference(conv, x)
    assert (torch.cat(pieces, dim=2) - expected).abs().max().item() <= 1e-5


def test_other_dtypes_keep_pytorchs_conv3d() -> None:
    conv = _conv(LAYERS[0]).double()
    x = torch.randn(1, 5, 4, 6, 6, dtype=torch.float64)
    assert not conv._uses_conv2d(x)
    with torch.no_grad():
        assert torch.equal(conv(x), _reference(conv, x))


def test_the_state_dict_keeps_conv3d_shaped_weights() -> None:
    vae = build_vae(get_vae_preset("tiny"))
    state = vae.state_dict()
    assert state["decoder.conv1.weight"].shape == (32, 16, 3, 3, 3)
    assert all(
        state[f"{name}.weight"].dim() == 5 for name, m in vae.named_modules() if isinstance(m, CausalConv3d)
    )

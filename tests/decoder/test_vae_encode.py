"""I2V conditioning: image fitting, Wan's mask layout, y = [mask ; latents of image + gray] per chunk."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from decoder.encode import I2VConditioning, area_fit_size, fit_to_size, i2v_mask, image_to_tensor
from decoder.vae import WanVAE, build_vae
from proto.vae_config import get_vae_preset


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(0)
    model = build_vae(get_vae_preset("tiny"))
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model


def _wan_mask(num_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The mask as wan/image2video.py builds it from pixel frames (reference/wan.md §2.2)."""
    msk = torch.ones(1, num_frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat(1, 4, 1, 1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


def test_mask_equals_wans_pixel_frame_construction() -> None:
    assert torch.equal(i2v_mask(21, 4, 6), _wan_mask(81, 4, 6))


def test_y_chunks_are_mask_then_latents_of_image_and_gray_frames(vae: WanVAE) -> None:
    torch.manual_seed(1)
    image = torch.rand(3, 16, 24) * 2 - 1
    cond = I2VConditioning(vae, image, horizon_latents=6)
    video = torch.cat([image[:, None], torch.zeros(3, 20, 16, 24)], dim=1)[None]
    latents = vae.encode(video)[0]
    y = torch.cat([cond.chunk(0), cond.chunk(1)], dim=1)
    assert cond.chunk(0).shape == (20, 3, 2, 3)
    assert torch.equal(y[:4], _wan_mask(21, 2, 3)[:, :6])
    assert (y[4:] - latents).abs().max().item() <= 1e-5


def test_chunks_past_the_horizon_repeat_its_last_chunk(vae: WanVAE) -> None:
    cond = I2VConditioning(vae, torch.zeros(3, 8, 8), horizon_latents=6)
    assert torch.equal(cond.chunk(2), cond.chunk(1))
    assert torch.equal(cond.chunk(1000), cond.chunk(1))
    assert not torch.equal(cond.chunk(0), cond.chunk(1))


def test_conditioning_rejects_image_sizes_not_multiple_of_8(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"image size 12x16 must be a multiple of 8.*fit_to_size"):
        I2VConditioning(vae, torch.zeros(3, 12, 16))


@pytest.mark.parametrize(
    ("height", "width", "max_area", "expected"),
    [
        (512, 512, 512 * 512, (512, 512)),
        (1080, 1920, 512 * 512, (384, 672)),
        (720, 1280, 480 * 832, (464, 832)),
    ],
)
def test_area_fit_follows_wans_formula(
    height: int, width: int, max_area: int, expected: tuple[int, int]
) -> None:
    assert area_fit_size(height, width, max_area) == expected


def test_fit_to_size_centre_crops_a_wide_image() -> None:
    pixels = torch.full((32, 64, 3), 128, dtype=torch.uint8)
    pixels[:, :16] = 255
    pixels[:, 48:] = 0
    fitted = fit_to_size(image_to_tensor(pixels), 32, 32)
    assert fitted.shape == (3, 32, 32)
    assert torch.allclose(fitted, torch.full_like(fitted, 128 / 127.5 - 1), atol=1e-6)


def test_fit_to_size_gives_the_exact_size_for_a_tall_image() -> None:
    assert fit_to_size(torch.zeros(3, 100, 50), 64, 48).shape == (3, 64, 48)


def test_image_to_tensor_maps_uint8_to_minus_one_one() -> None:
    pixels = torch.tensor([[[0, 255, 0]]], dtype=torch.uint8)
    assert image_to_tensor(pixels).flatten().tolist() == [-1.0, 1.0, -1.0]
    with pytest.raises(ValueError, match=r"uint8 RGB \[H, W, 3\]"):
        image_to_tensor(torch.zeros(4, 4, 3))


def test_liveact_y_is_the_14_latents_of_the_image_and_52_gray_frames_chunk_0_gets_0_to_6_the_rest_6_to_14(
    vae: WanVAE,
) -> None:
    from proto.stream_config import StreamConfig

    torch.manual_seed(2)
    stream = StreamConfig.for_schedule("soulx-liveact", height=16, width=16)
    image = (torch.rand(16, 16, 3) * 255).to(torch.uint8)
    cond = I2VConditioning.for_stream(vae, image.numpy(), stream)
    # upstream's get_y: VAE-encode [image, 52 black (0 in [-1, 1]) frames] → 14 latents, mask on latent 0
    video = torch.cat([image_to_tensor(image)[:, None], torch.zeros(3, 52, 16, 16)], dim=1)[None]
    latents = vae.encode(video)[0]
    assert cond.clip.shape == (20, 14, 2, 2)
    assert torch.equal(cond.clip[:4], _wan_mask(53, 2, 2))
    assert (cond.clip[4:] - latents).abs().max().item() <= 1e-5
    assert torch.equal(cond.chunk(0), cond.clip[:, 0:6])
    for index in (1, 2, 7):
        assert torch.equal(cond.chunk(index), cond.clip[:, 6:14])
    assert cond.chunk(0).shape[1] == stream.frames_in_chunk(0) and cond.chunk(3).shape[1] == 8


def test_the_horizon_must_be_the_first_chunk_plus_whole_chunks(vae: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"first chunk's 6 latents plus a whole number of chunks"):
        I2VConditioning(vae, torch.zeros(3, 8, 8), chunk_latents=8, first_chunk_latents=6, horizon_latents=15)

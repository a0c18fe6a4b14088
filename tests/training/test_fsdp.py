"""FSDP2/HSDP (training/fsdp.py) on 2 gloo processes computes the same training step as one process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from distributed.dist_world import run_world

from proto.model_config import get_model_preset
from training.batches import ChunkAudioWanModel, ClipEncoder, ModelInputs, load_or_build_vae
from training.data import DataConfig, SyntheticTalkingDataset
from training.fsdp import (
    FSDPConfig,
    build_mesh,
    full_state_dict,
    grad_norm,
    mean_over_ranks,
    rank_slice,
    shard_model,
)
from training.teacher import flow_matching_loss

pytestmark = pytest.mark.equality  # tests/test_cpu_matrix.py reruns these at 2 threads and on AVX2

LR = 0.5


def _model() -> ChunkAudioWanModel:
    torch.manual_seed(0)
    model = ChunkAudioWanModel(get_model_preset("tiny"))
    model.init_weights(zero_head=False, zero_audio=False)
    return model


def _sgd_step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad


def _fsdp_step_matches_one_process(
    rank: int, world_size: int, batch_file: str, mesh: tuple[int, int], checkpointing: bool
) -> None:
    batch = torch.load(batch_file, weights_only=True)
    inputs = ModelInputs.from_state(batch)
    noise, sigma = batch["noise"], batch["sigma"]

    reference = _model()
    model = copy.deepcopy(reference)
    ref_loss = flow_matching_loss(reference, inputs, noise, sigma)
    ref_loss.backward()
    ref_norm = grad_norm(reference)
    _sgd_step(reference)

    cfg = FSDPConfig(replicate=mesh[0], shard=mesh[1], activation_checkpointing=checkpointing)
    shard_model(model, build_mesh(cfg), cfg)
    mine = rank_slice(inputs.batch_size)
    loss = flow_matching_loss(model, inputs.select(mine), noise[mine], sigma[mine])
    loss.backward()
    norm = grad_norm(model)
    _sgd_step(model)
    updated = full_state_dict(model)

    torch.testing.assert_close(mean_over_ranks(loss), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-7)
    if rank == 0:  # the full state dict is gathered to rank 0
        assert updated.keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(updated[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = DataConfig(height=32, width=32, num_frames=21, two_character_prob=0.5, silent_prob=0.0)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny"))
    dataset = SyntheticTalkingDataset(data, seed=2)
    inputs = encoder.encode_many([dataset.clip(i) for i in range(4)])
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("fsdp") / "batch.pt"
    noise = torch.randn(inputs.latents.shape, generator=g)
    torch.save({**inputs.state(), "noise": noise, "sigma": torch.tensor([0.2, 0.4, 0.6, 0.8])}, path)
    return path


@pytest.mark.parametrize(
    ("mesh", "checkpointing"),
    [((1, 2), True), ((2, 1), False)],
    ids=["fsdp-1x2-activation-checkpointing", "hsdp-2x1"],
)
def test_two_gloo_ranks_give_the_one_process_loss_gradient_norm_and_update(
    batch_file: Path, tmp_path: Path, mesh: tuple[int, int], checkpointing: bool
) -> None:
    run_world(_fsdp_step_matches_one_process, 2, tmp_path, str(batch_file), mesh, checkpointing)


def test_mesh_shape_must_cover_the_world() -> None:
    assert FSDPConfig(replicate=2).mesh_shape(8) == (2, 4)
    with pytest.raises(ValueError, match="replicate x shard = world size"):
        FSDPConfig(replicate=2, shard=3).mesh_shape(8)
    with pytest.raises(ValueError, match="must divide the world size"):
        FSDPConfig(replicate=3).mesh_shape(8)

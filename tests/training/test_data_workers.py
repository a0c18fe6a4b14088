"""Data workers (`--data-workers`): clips drawn and conditioned in spawned processes are the clips drawn in
the training process, bit for bit; the device option refuses what this machine cannot do."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from decoder.checkpoint import save_vae_checkpoint
from proto.model_config import get_model_preset
from training.batches import (
    ClipEncoder,
    cache_conditioning_key,
    encode_dataset,
    load_or_build_vae,
    vae_identity,
)
from training.data import Clip, DataConfig, SyntheticTalkingDataset
from training.devices import check_device
from training.distill import StudentConfig
from training.teacher import TeacherConfig, load_clip_inputs
from training.vae_stage import StreamSource, VAEStageConfig, _draw_arrays, sample_stream

DATA = DataConfig(height=32, width=32, num_frames=21, two_character_prob=0.5, silent_prob=0.2)


def test_clips_encoded_with_workers_equal_clips_encoded_in_process() -> None:
    torch.set_num_threads(1)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny"))
    dataset = SyntheticTalkingDataset(DATA, seed=3)
    indices = [0, 1, 2, 5, 8, 13]
    here = encode_dataset(dataset, indices, encoder, vae_batch=4)
    spawned = encode_dataset(dataset, indices, encoder, workers=2, vae_batch=4)
    for field in dataclasses.fields(here):
        a, b = getattr(here, field.name), getattr(spawned, field.name)
        assert a.shape == b.shape and torch.equal(a, b), field.name
    assert here.face_mask[:, 1].sum() > 0  # two-character clips are among them (a second mask is set)


def test_prefetched_streams_equal_streams_drawn_in_process() -> None:
    cfg = VAEStageConfig(data=DATA, batch_size=2, clip_frames=5, stream_windows=2, minutes_budget=None)
    dataset = SyntheticTalkingDataset(cfg.data, seed=cfg.seed)
    source = StreamSource(dataset, dataclasses.replace(cfg, data_workers=2))
    try:
        for stream in (0, 1, 4, 2):  # in order, skipping ahead (a resumed run), and back
            video, mouth = source.get(stream)
            want_video, want_mouth = sample_stream(dataset, cfg, stream)
            assert torch.equal(video, want_video) and torch.equal(mouth, want_mouth)
    finally:
        source.close()


def test_streams_survive_a_worker_that_exits_right_after_its_task() -> None:
    """What a pool worker sends must not need the worker afterwards. A tensor result crosses as a file
    descriptor that the parent fetches from the worker while unpickling; once the worker has exited (as it
    does when the pool terminates, or here after every task) that fails, the pool's result thread dies and
    `terminate()` raises "Cannot have cache with result_hander not alive" (the CI failure this guards)."""
    import functools
    import multiprocessing

    cfg = VAEStageConfig(data=DATA, batch_size=2, clip_frames=5, stream_windows=2, minutes_budget=None)
    dataset = SyntheticTalkingDataset(cfg.data, seed=cfg.seed)
    draw = functools.partial(_draw_arrays, functools.partial(sample_stream, dataset, cfg))
    pool = multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1)
    try:
        pending = [pool.apply_async(draw, (stream,)) for stream in range(4)]
        got = [p.get(timeout=60) for p in pending]
    finally:
        pool.terminate()
        pool.join()
    for stream, arrays in enumerate(got):
        want = sample_stream(dataset, cfg, stream)
        assert all(torch.equal(torch.from_numpy(a), w) for a, w in zip(arrays, want, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("config", [TeacherConfig, StudentConfig, VAEStageConfig])
def test_a_gpu_is_refused_plainly_where_there_is_none(config: type) -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        config(device="cuda")


def test_unknown_devices_and_negative_workers_are_refused() -> None:
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda"):
        check_device("meta")
    with pytest.raises(ValueError, match="data_workers"):
        TeacherConfig(data_workers=-1)


class _CountingDataset:
    def __init__(self, dataset: SyntheticTalkingDataset) -> None:
        self.dataset = dataset
        self.drawn: list[int] = []

    def clip(self, index: int) -> Clip:
        self.drawn.append(index)
        return self.dataset.clip(index)


def test_a_grown_data_set_encodes_only_its_new_clips(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny"))
    dataset = _CountingDataset(SyntheticTalkingDataset(DATA, seed=4))
    cache = tmp_path / "inputs.pt"
    encode_dataset(dataset, [0, 1, 2], encoder, cache, key="k")
    grown = encode_dataset(dataset, [1, 3, 0, 2], encoder, cache, key="k")
    assert dataset.drawn == [0, 1, 2, 3]  # clip 3 alone was drawn the second time
    fresh = encode_dataset(SyntheticTalkingDataset(DATA, seed=4), [1, 3, 0, 2], encoder)
    for field in dataclasses.fields(fresh):  # VAE outputs: batches of other sizes round differently
        a, b = getattr(grown, field.name), getattr(fresh, field.name)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5), field.name
    assert torch.equal(grown.audio_span, fresh.audio_span) and torch.equal(grown.mouth, fresh.mouth)
    subset = encode_dataset(dataset, [2], encoder, cache, key="k")
    assert dataset.drawn == [0, 1, 2, 3] and torch.equal(subset.latents, grown.latents[3:])
    assert torch.load(cache, weights_only=True)["indices"] == [1, 3, 0, 2]  # the subset kept the file
    encode_dataset(dataset, [0], encoder, cache, key="other")  # another key: encoded afresh
    assert dataset.drawn[-1] == 0


def test_the_clip_cache_follows_the_vae_content_not_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory copied elsewhere keeps its encoded clips; another VAE at the same path does not."""
    torch.set_num_threads(1)
    vae_path = tmp_path / "a" / "vae.pth"
    vae_path.parent.mkdir()
    save_vae_checkpoint(load_or_build_vae(None, "tiny", seed=1), vae_path)
    encoder = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(str(vae_path), "tiny"))
    first, _ = load_clip_inputs(DATA, encoder, 2, 1, tmp_path / "cache", 0, str(vae_path))
    copied = tmp_path / "b" / "vae.pth"
    copied.parent.mkdir()
    shutil.copy(vae_path, copied)
    assert vae_identity(str(copied)) == vae_identity(str(vae_path)) != vae_identity(None)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("encoded again")

    monkeypatch.setattr(encoder, "encode_many", refuse)
    again, _ = load_clip_inputs(DATA, encoder, 2, 1, tmp_path / "cache", 0, str(copied))
    assert torch.equal(again.latents, first.latents)
    save_vae_checkpoint(load_or_build_vae(None, "tiny", seed=2), copied)  # other weights, same path
    other = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(str(copied), "tiny"))
    monkeypatch.setattr(other, "encode_many", refuse)  # only the latents are encoded again (next test)
    third, _ = load_clip_inputs(DATA, other, 2, 1, tmp_path / "cache", 0, str(copied))
    assert not torch.allclose(third.latents, first.latents)
    assert torch.equal(third.audio_span, first.audio_span)


def test_another_vae_encodes_the_latents_again_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    dataset = _CountingDataset(SyntheticTalkingDataset(DATA, seed=4))
    cache = tmp_path / "inputs.pt"
    first = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny", seed=1))
    old = encode_dataset(dataset, [0, 1, 2], first, cache, key="vae1", conditioning_key="c")
    second = ClipEncoder(get_model_preset("tiny"), load_or_build_vae(None, "tiny", seed=2))
    conditioned: list[int] = []
    real_rest = second._encode_rest
    monkeypatch.setattr(second, "_encode_rest", lambda clip, n: conditioned.append(1) or real_rest(clip, n))
    dataset.drawn.clear()
    new = encode_dataset(dataset, [2, 0, 3], second, cache, key="vae2", conditioning_key="c", vae_batch=2)
    assert sorted(dataset.drawn) == [0, 2, 3]  # cached clips asked for: drawn for their pixels; 3 anew
    assert len(conditioned) == 1  # ... but only clip 3 had its audio, image and faces encoded
    fresh = encode_dataset(SyntheticTalkingDataset(DATA, seed=4), [2, 0, 3], second, vae_batch=3)
    for field in dataclasses.fields(fresh):
        a, b = getattr(new, field.name), getattr(fresh, field.name)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5), field.name
    assert torch.equal(new.audio_span[:2], old.audio_span[[2, 0]])
    assert not torch.allclose(new.latents[:2], old.latents[[2, 0]])
    conditioned.clear()
    saved = torch.load(cache, weights_only=True)
    assert saved["key"] == "vae2" and saved["conditioning_key"] == "c" and saved["indices"] == [2, 0, 3]
    dataset.drawn.clear()
    again = encode_dataset(dataset, [0, 2], second, cache, key="vae2", conditioning_key="c")
    assert dataset.drawn == [] and torch.equal(again.latents, new.latents[[1, 0]])
    # other data (another conditioning key): everything encoded afresh
    encode_dataset(dataset, [0], second, cache, key="vae2 other", conditioning_key="other")
    assert dataset.drawn == [0] and len(conditioned) == 1


def test_caches_from_before_the_conditioning_key_read_it_from_their_key() -> None:
    key = "DataConfig(height=64)|seed=0|vae=sha256:ab12|tiny|FeaturizerConfig(dim=32)"
    expected = "DataConfig(height=64)|seed=0|tiny|FeaturizerConfig(dim=32)"
    assert cache_conditioning_key({"key": key}) == expected
    assert cache_conditioning_key({"key": key, "conditioning_key": "c"}) == "c"
    assert cache_conditioning_key({"key": "k"}) is None

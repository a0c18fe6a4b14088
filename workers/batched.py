"""Batched sessions on the score side: chunk i_b of sessions b = 1..B denoised in ONE forward per pass.

``denoise_batch(engine, items)`` (also ``StreamingDiT.denoise_batch``) takes one ``BatchItem`` per session
(its ``SessionState``, chunk index, y, audio, noise: exactly the arguments of ``denoise_chunk``) and returns
each session's x0, as ``denoise_chunk`` would have, within float32 rounding (tests/workers/
test_batched_sessions.py: two and three sessions, several chunks, <= 1e-5).

Which sessions share a forward (``batch_key``): those whose pass has the same shape and the same cache
geometry: the sparse-causal window, the same chunk class (chunk 0, chunk 1, or a later chunk: the visible
cache is 1, 2 or 3 chunks), the same RoPE table (the chunk's temporal start: equal for all later chunks once
the `window` position mode has stopped moving, per chunk index in `absolute` mode), the same number of
characters and the same optional inputs (y, audio). Sessions with no partner run alone (``denoise_chunk``),
so a batch of mixed sessions still gives every session its exact chunk.

The cache: stacked per pass, not pooled. Each session keeps its own preallocated ``ChunkKVCache`` (batch 1,
nothing about the sessions' lifetimes changes). Before each pass the visible part of that pass's slot of every
session is copied into one batch buffer ``[layers, B, visible, H, D]`` (keys and values, allocated once per
chunk and reused by its passes), in a canonical order: sink c_0, then c_{t−1}, then the chunk's own place, so
every session writes at the same offset whatever its ring parity (attention does not depend on the order of
its keys, up to float32 rounding); after the pass the chunk's keys/values are copied back to the session's
ring position. Cost per pass and session: one read + write of the context's keys/values (at most 2 chunks'
worth, which the attention reads anyway) and one chunk's worth back, i.e. about 3× the pass's own cache
traffic; temporary memory: one slot of B sessions' visible cache (B × 3 chunks × layers × H/P heads × D, keys
and values). A pooled cache (sessions' caches as rows of one preallocated tensor) would avoid the copies, but
batches would then have to be contiguous rows, or gathered anyway, and a session's memory would be fixed at
the pool's size. Cross-attention K/V (per session, per block) and the chunk's audio K/V are concatenated once
per chunk, not per pass.

Sequence parallelism works unchanged: every rank stacks its own head shard of each session's cache, and the
all-to-alls of ``workers.sp`` carry the batch dimension (each batch element is sharded as alone). Both cache
modes: per-step (slot s per pass) and clean-context (slot 0, the refresh pass written back like the others).
Under ``compile=True`` every batch size is a shape of its own: the blocks compile again for each (unmeasured).

Not batched: the convkv-memory window (SoulX-LiveAct). Its passes interleave a per-session ConvKV memory
update of the slot, the audio-from-step switch, a null-audio CFG pass on its own slot and a muted first frame
for chunk 0; each would need its own stacked variant and equality test, so its sessions run alone (a batch
of such sessions is still correct, with no speed-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.audio import AudioConditioning, InfiniteTalkAudio
from workers.kv_cache import ChunkKVCache
from workers.model import KV
from workers.sampler import predict_x0, renoise

if TYPE_CHECKING:
    from workers.streaming import SessionState, StreamingDiT


@dataclass
class BatchItem:
    """One session's chunk in a batch: the arguments of ``StreamingDiT.denoise_chunk``.

    noise `[S, 16, F, h, w]` (required: a batch draws no noise of its own), y `[20, F, h, w]` or None, audio
    with batch 1 or None.
    """

    state: SessionState
    chunk_index: int
    noise: torch.Tensor
    y: torch.Tensor | None = None
    audio: AudioConditioning | InfiniteTalkAudio | None = None
    steps: tuple[int, ...] = ()  # a degraded chunk's denoising steps (engine.degrade); (): all of them


def batch_key(engine: StreamingDiT, item: BatchItem) -> tuple | None:
    """What must agree for items to share a forward; None: this item always runs alone."""
    if engine.memory_window or not isinstance(item.state.cache, ChunkKVCache):
        return None
    if not isinstance(item.state.cache.k, torch.Tensor):  # the FP8 cache (kv_cache.Fp8KV) is not stacked
        return None
    if item.steps and len(item.steps) < len(engine.sigmas):  # a degraded chunk runs its own schedule alone
        return None
    audio = item.audio
    if audio is not None and not isinstance(audio, AudioConditioning):
        return None
    characters = None
    if audio is not None:
        source = audio.tokens if audio.tokens is not None else audio.features
        characters = (source.shape[1], audio.face_mask is not None)
    return (
        min(item.chunk_index, 2),
        engine.chunk_start(item.chunk_index),
        engine.previous_shift(item.chunk_index) != 0,
        item.y is None,
        characters,
        item.state.cache.k.dtype,
        item.noise.device,
    )


def group_items(engine: StreamingDiT, items: Sequence[BatchItem]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``batch_key`` (first appearance order); unbatchable ones alone."""
    groups: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    for i, item in enumerate(items):
        key = batch_key(engine, item)
        if key is None:
            alone.append([i])
        else:
            groups.setdefault(key, []).append(i)
    return [*groups.values(), *alone]


@torch.no_grad()
def denoise_batch(engine: StreamingDiT, items: Sequence[BatchItem]) -> list[torch.Tensor]:
    """Denoise every item's chunk (each its session's next chunk); x0 `[16, F, h, w]` per item, in order.

    Items of distinct sessions only (a session's chunks are causal). Compatible items (``batch_key``) share
    one forward per pass; the others run alone through ``denoise_chunk``.
    """
    ids = [id(item.state) for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("a batch holds at most one chunk per session (chunks of a session are causal)")
    for item in items:  # everything checked before any session's cache changes
        shape = (len(engine.timesteps), *engine.stream.latent_shape(item.chunk_index))
        if tuple(item.noise.shape) != shape:
            raise ValueError(
                f"noise has shape {tuple(item.noise.shape)}, expected [steps, 16, F, h, w] = {shape}"
            )
        if item.chunk_index != item.state.next_chunk:
            raise ValueError(
                f"chunk {item.chunk_index} requested but the session expects chunk {item.state.next_chunk}; "
                "chunks are causal and must be denoised in order (reset_session to restart)"
            )
    out: list[torch.Tensor | None] = [None] * len(items)
    for group in group_items(engine, items):
        if len(group) == 1:
            item = items[group[0]]
            out[group[0]] = engine.denoise_chunk(
                item.state,
                item.chunk_index,
                y=item.y,
                audio=item.audio,
                noise=item.noise,
                steps=item.steps,
            )
            continue
        for i, x0 in zip(group, _denoise_together(engine, [items[i] for i in group]), strict=True):
            out[i] = x0
    return [x for x in out if x is not None]


def _cat_kv(kvs: Sequence[Sequence[KV]]) -> list[KV]:
    """Per block, the sessions' (k, v) concatenated on the batch dimension."""
    return [
        (torch.cat([kv[i][0] for kv in kvs]), torch.cat([kv[i][1] for kv in kvs])) for i in range(len(kvs[0]))
    ]


def _denoise_together(engine: StreamingDiT, items: Sequence[BatchItem]) -> list[torch.Tensor]:
    """Items of one ``batch_key``: one forward per pass over all of them (see the module docstring)."""
    stream, model = engine.stream, engine.model
    param = next(model.parameters())
    b = len(items)
    index0 = items[0].chunk_index
    noise = torch.stack([item.noise.to(param.device) for item in items], dim=1)  # [S, B, 16, F, h, w]
    y = None if items[0].y is None else torch.stack([item.y.to(param.device) for item in items])
    # Per session, once per chunk: the window's shift of c_{t−1} (in its own cache), its audio keys/values.
    audio_kvs: list[list[KV]] = []
    face_masks: list[torch.Tensor] = []
    rope = None
    for item in items:
        shift = engine.previous_shift(item.chunk_index)
        if shift:
            cos, sin = engine._table(("shift", shift), param.device)
            cache = item.state.cache
            cache.shift_position(cache.position(item.chunk_index - 1), cos, sin, engine._shift_work)
        rope, audio_kv, face_mask = engine.chunk_inputs(item.chunk_index, item.audio, param.device)
        if audio_kv is not None:
            audio_kvs.append(audio_kv)
        if face_mask is not None:
            face_masks.append(face_mask)
    assert rope is not None
    audio_kv_b = _cat_kv(audio_kvs) if audio_kvs else None
    face_mask_b = torch.cat(face_masks) if face_masks else None
    cross_kv = [
        {
            name: torch.cat([item.state.cross_kv[i][name] for item in items])
            for name in items[0].state.cross_kv[i]
        }
        for i in range(len(items[0].state.cross_kv))
    ]
    caches = [item.state.cache for item in items]
    first = caches[0]
    assert isinstance(first, ChunkKVCache)
    length = first.tokens
    visible = first.visible(index0)
    write_at = visible - length  # canonical: [c_0, c_{t−1}, the chunk] (chunk 0: [the chunk])
    k_buf = torch.empty(
        (first.num_layers, b, visible, *first.k.shape[-2:]), dtype=first.k.dtype, device=first.k.device
    )
    v_buf = torch.empty_like(k_buf)

    def forward(x: torch.Tensor, pass_index: int) -> torch.Tensor:
        slot = pass_index if stream.cache_mode == "per-step" else 0
        for j, (item, cache) in enumerate(zip(items, caches, strict=True)):
            assert isinstance(cache, ChunkKVCache)
            k, v = cache.slot_views(slot)  # [layers, 1, 3L, H, D]
            if write_at:  # the context: c_0, then (from chunk 2 on) c_{t−1} at its ring position
                k_buf[:, j, :length].copy_(k[:, 0, :length])
                v_buf[:, j, :length].copy_(v[:, 0, :length])
            if write_at > length:
                prev = cache.position(item.chunk_index - 1) * length
                k_buf[:, j, length : 2 * length].copy_(k[:, 0, prev : prev + length])
                v_buf[:, j, length : 2 * length].copy_(v[:, 0, prev : prev + length])
        e, e0 = items[0].state.time_emb[pass_index]  # the same schedule for every session
        velocity = model.forward_step(
            x,
            e.expand(b, *e.shape[1:]),
            e0.expand(b, *e0.shape[1:]),
            rope,
            k_buf,
            v_buf,
            write_at,
            visible,
            cross_kv,
            y=y,
            audio_kv=audio_kv_b,
            face_mask=face_mask_b,
            sp_group=engine.sp_group,
            blocks=engine.blocks,
        )
        for j, (item, cache) in enumerate(zip(items, caches, strict=True)):  # the chunk's keys/values back
            assert isinstance(cache, ChunkKVCache)
            k, v = cache.slot_views(slot)
            at = cache.write_offset(item.chunk_index)
            k[:, 0, at : at + length].copy_(k_buf[:, j, write_at:])
            v[:, 0, at : at + length].copy_(v_buf[:, j, write_at:])
        return velocity

    x = noise[0]
    x0 = x
    for s, sigma in enumerate(engine.sigmas):
        v = forward(x, s)
        x0 = predict_x0(x, v.to(x.dtype), sigma)
        if s + 1 < len(engine.sigmas):
            x = renoise(x0, engine.sigmas[s + 1], noise[s + 1])
    if stream.cache_mode == "clean-context":  # the σ = 0 refresh writes the chunks' clean keys
        forward(x0, len(engine.sigmas))
    for item in items:
        item.state.next_chunk += 1
    return list(x0.unbind(0))

"""One score worker's share of the serving group: sessions by id, validated wire inputs, the SP engine.

Every worker rank of the SP group (and, in a colocated topology, rank 0 too, inline) holds one
``ScoreRank``, and calls the same method with the same message and tensors at the same time — the SP
all-to-alls inside ``denoise`` line up because the calls do. Everything a message carries is checked
against ``proto.chunk_specs`` before any collective runs, and a mismatch raises ``proto.wire.WireError``
naming the field: every rank checks the same header against the same state, so they all refuse it together
and the group stays in step (``workers.worker_loop`` turns the error into a ``WorkerFailed`` reply).

Both audio variants. The talkingmachines ``audio`` tensor ``[C, F + window − 1, ...]`` becomes
``AudioConditioning`` with the speaking flags and the session's face masks. The infinitetalk (SoulX-LiveAct)
``audio`` tensor ``[1, T, audio_window, layers, dim]`` — one speaker, the character axis is the batch of
one — becomes ``InfiniteTalkAudio(windows=audio, starts_clip=(chunk_index == 0))``; its ``speaking`` flags
(one row of ``frames_in_chunk(i)``) are checked and unused (the variant has no silence embedding: silence is
in the audio features), and ``face_boxes`` are shape-checked and unused (one speaker, no face mask). Chunk
sizes may differ per chunk (LiveAct: 6 latent frames, then 8): every spec and the noise are chunk ``i``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from proto.chunk_specs import chunk_noise, chunk_request_specs, session_open_specs
from proto.model_config import InfiniteTalkAudioConfig
from proto.staging import HostStaging
from proto.stream_config import StreamConfig
from proto.topology import ProcessGroups
from proto.wire import (
    ChunkBatchRequest,
    ChunkRequest,
    SessionClose,
    SessionOpen,
    TensorSpec,
    WireError,
    check_specs,
)
from workers.audio import AudioConditioning, InfiniteTalkAudio, face_token_mask
from workers.batched import BatchItem
from workers.model import WanModel
from workers.streaming import SessionState, StreamingDiT


@dataclass
class _Session:
    state: SessionState
    num_characters: int
    face_mask: torch.Tensor | None  # [1, C, F·h·w] float, this chunk layout's face tokens per character


class ScoreRank:
    """The score side of one rank: ``open_session`` / ``denoise`` / ``close_session`` driven by wire messages.

    Args:
        model: a ``WanModel`` (an SP engine is built over ``groups.sp``) or a ready ``StreamingDiT`` (whose
            ``sp_group`` must be ``groups.sp``).
        stream: the serving group's stream configuration (the same on every rank and on the master).
        groups: this rank's process groups; ``None`` for a single process (no SP, this rank is the leader).
        compile: build the engine with torch.compile'd blocks (``--compile``; ignored for a ready engine).
        cuda_graphs: build the engine with CUDA-graph replay of its passes (``--cuda-graphs``; likewise).
        kv_cache_dtype: the engine's self-attention cache storage, ``auto`` or ``fp8``
            (``--kv-cache-dtype``; ignored for a ready engine).
    """

    def __init__(
        self,
        model: WanModel | StreamingDiT,
        stream: StreamConfig,
        groups: ProcessGroups | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        kv_cache_dtype: str = "auto",
    ) -> None:
        sp_group = None if groups is None else groups.sp
        if isinstance(model, StreamingDiT):
            if model.stream != stream:
                raise ValueError(f"the engine streams {model.stream}, but the rank was given {stream}")
            if model.sp_group is not sp_group:
                raise ValueError("the engine's sp_group is not this rank's groups.sp; rebuild it")
            self.engine = model
        else:
            self.engine = StreamingDiT(
                model,
                stream,
                sp_group=sp_group,
                compile=compile,
                cuda_graphs=cuda_graphs,
                kv_cache_dtype=kv_cache_dtype,
            )
        self.stream = stream
        self.config = self.engine.model.config
        self.rank = 0 if groups is None else groups.rank
        self.is_leader = groups is None or groups.is_sp_leader
        self.device = next(self.engine.model.parameters()).device
        # Noise, flags and host tensors reach the device through pinned buffers, asynchronously.
        self.staging = HostStaging(self.device)
        self.sessions: dict[str, _Session] = {}

    # ---- messages ------------------------------------------------------------------------------------

    def open_session(self, msg: SessionOpen, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start session ``msg.session_id``: cross-attention K/V from ``context``/``clip_fea``, face masks."""
        where = f"SessionOpen {msg.session_id!r}"
        if msg.session_id in self.sessions:
            raise WireError(f"{where}: session_id is already open on rank {self.rank}; close it first")
        msg.expect(latent_height=self.stream.latent_height, latent_width=self.stream.latent_width)
        if msg.num_characters < 1:
            raise WireError(f"{where}.num_characters: expected >= 1, received {msg.num_characters}")
        if self._infinitetalk and msg.num_characters != 1:
            raise WireError(
                f"{where}.num_characters: expected 1, received {msg.num_characters} (preset "
                f"{self.config.name!r} has the infinitetalk audio variant, which drives one speaker)"
            )
        self._check_tensors(where, session_open_specs(self.config, msg.num_characters), msg.tensors, tensors)
        face_mask = None
        if "face_boxes" in tensors and not self._infinitetalk:
            try:
                mask = face_token_mask(
                    tensors["face_boxes"].cpu(),
                    self.stream.token_height,
                    self.stream.token_width,
                    self.stream.chunk_latent_frames,
                )
            except ValueError as exc:
                raise WireError(f"{where}.tensors['face_boxes']: {exc}") from exc
            face_mask = mask[None].float().to(self.device)
        context = tensors["context"].to(self.device)
        state = self.engine.open_session(context, self._optional(tensors, "clip_fea"))
        self.sessions[msg.session_id] = _Session(state, msg.num_characters, face_mask)

    def denoise(self, msg: ChunkRequest, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Denoise chunk ``msg.chunk_index``: the clean latent ``[16, F, h, w]`` float32 on the SP leader
        (on this rank's device), ``None`` on the other workers."""
        item = self._chunk_item(msg, tensors)
        x0 = self.engine.denoise_chunk(
            item.state,
            item.chunk_index,
            y=item.y,
            audio=item.audio,
            noise=item.noise,
            steps=item.steps,
        )
        return x0.float().contiguous() if self.is_leader else None

    def denoise_batch(
        self, msg: ChunkBatchRequest, tensors: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Denoise one chunk of each session of ``msg`` together (``workers.batched``): every request is
        validated as ``denoise`` validates it, all before any forward (so every rank refuses a bad batch
        before any collective); the latents ``[16, F, h, w]`` float32 in request order on the SP leader,
        ``None`` on the other workers."""
        check_specs("ChunkBatchRequest", msg.tensors, tuple(TensorSpec.of(n, t) for n, t in tensors.items()))
        parts = msg.split(tensors)
        items = [
            self._chunk_item(request, part, slot=b)
            for b, (request, part) in enumerate(zip(msg.requests, parts, strict=True))
        ]
        latents = self.engine.denoise_batch(items)
        return [x0.float().contiguous() for x0 in latents] if self.is_leader else None

    def _chunk_item(self, msg: ChunkRequest, tensors: Mapping[str, torch.Tensor], slot: int = 0) -> BatchItem:
        """Chunk ``msg.chunk_index``'s validated inputs on this rank's device (``slot``: the request's place
        in a batch, so each has staging buffers of its own)."""
        session = self._session(msg.session_id, "ChunkRequest")
        where = f"ChunkRequest {msg.session_id!r} chunk {msg.chunk_index}"
        msg.expect(chunk_index=session.state.next_chunk)
        try:  # a degraded chunk's steps (engine.degrade), checked before any collective runs
            steps = self.engine.check_step_indices(msg.step_indices)
        except ValueError as exc:
            raise WireError(f"{where}.step_indices: {exc}") from exc
        index = msg.chunk_index
        specs = chunk_request_specs(self.config, self.stream, session.num_characters, index)
        self._check_tensors(where, specs, msg.tensors, tensors)
        audio: AudioConditioning | InfiniteTalkAudio | None = None
        if self.config.audio is not None:
            frames = self.stream.frames_in_chunk(index)
            shape = tuple(len(row) for row in msg.speaking)
            if shape != (frames,) * session.num_characters:
                raise WireError(
                    f"{where}.speaking: expected {session.num_characters} rows of {frames} flags "
                    f"(characters × latent frames), received rows of lengths {list(shape)}"
                )
            features = self.staging.to_device(self._stage("audio", index, slot), tensors["audio"])
            if self._infinitetalk:
                audio = InfiniteTalkAudio(windows=features, starts_clip=index == 0)
            else:
                speaking = self.staging.tensor(self._stage("speaking", 1, slot), msg.speaking, torch.bool)
                audio = AudioConditioning(
                    features=features[None], speaking=speaking[None], face_mask=session.face_mask
                )
        noise = chunk_noise(msg.noise_seed, len(self.engine.timesteps), self.stream.latent_shape(index))
        return BatchItem(
            session.state,
            index,
            y=self._optional(tensors, "y", index, slot),
            audio=audio,
            noise=self.staging.to_device(self._stage("noise", index, slot), noise),
            steps=steps,
        )

    def close_session(self, msg: SessionClose) -> None:
        """Free session ``msg.session_id``'s caches."""
        session = self._session(msg.session_id, "SessionClose")
        self.engine.close_session(session.state)
        del self.sessions[msg.session_id]

    # ---- helpers -------------------------------------------------------------------------------------

    def _session(self, session_id: str, what: str) -> _Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise WireError(
                f"{what}.session_id: {session_id!r} is not an open session on rank {self.rank} "
                f"(open: {sorted(self.sessions)}); send SessionOpen first"
            )
        return session

    @property
    def _infinitetalk(self) -> bool:
        return isinstance(self.config.audio, InfiniteTalkAudioConfig)

    def _stage(self, name: str, chunk_index: int, slot: int = 0) -> str:
        """The staging buffer of a per-chunk tensor: chunk 0 has its own when its size differs (LiveAct), so
        the later chunks' buffers are not reallocated whenever a session starts; a batch's request ``slot``
        > 0 has its own too."""
        if slot:
            name = f"{name}#{slot}"
        if chunk_index == 0 and self.stream.frames_in_chunk(0) != self.stream.chunk_latent_frames:
            return f"{name}.first"
        return name

    def _optional(
        self, tensors: Mapping[str, torch.Tensor], name: str, chunk_index: int = 1, slot: int = 0
    ) -> torch.Tensor | None:
        if name not in tensors:
            return None
        return self.staging.to_device(self._stage(name, chunk_index, slot), tensors[name])

    @staticmethod
    def _check_tensors(
        where: str,
        expected: tuple[TensorSpec, ...],
        declared: tuple[TensorSpec, ...],
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        """The header declares ``expected`` and the received tensors match it (names, shapes, dtypes)."""
        check_specs(where, expected, declared)
        if list(tensors) != [s.name for s in expected]:
            names = [s.name for s in expected]
            raise WireError(f"{where}.tensors: expected {names}, received {list(tensors)}")
        for spec in expected:
            spec.check(tensors[spec.name], where)

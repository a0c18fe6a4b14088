"""What a new live session of ``serve`` is made of (``server.live_backend`` creates sessions with it): its
state (I2V conditioning of the reference image, one streaming audio featurizer per character sharing the
server's wav2vec2, its decoder), its ``SessionOpen`` for the workers, and its output (a LiveKit room joined
on the server's asyncio loop, or an MP4 file written in real time).

The audio front-end is the model family's (``ModelConfig.audio_variant``): the TalkingMachines streaming
featurizer (``frontends.audio_features``), or for the InfiniteTalk family (SoulX-LiveAct) the live
``frontends.infinitetalk_chunks.StreamChunkAudio`` over upstream's wav2vec2 pipeline; that family speaks
with one character only (upstream's multi-speaker path is not implemented), so more are refused (422)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decoder.encode import I2VConditioning
from decoder.streaming import DecodeOptions
from decoder.vae import WanVAE
from engine.degrade import DegradeConfig
from engine.session_open import reference_image, session_open
from frontends.audio_features import (
    AudioFeaturizer,
    AudioFeaturizerConfig,
    build_wav2vec2,
    check_matches,
    featurizer_config_for,
)
from frontends.conditioning import ConditioningEncoders
from frontends.infinitetalk_audio import InfiniteTalkAudio
from frontends.infinitetalk_chunks import StreamChunkAudio, build_front_end
from proto.api import Face, FileOutput, LiveKitOutput, Output
from proto.model_config import InfiniteTalkAudioConfig as ModelAudio
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from proto.wire import SessionOpen
from server.audio_ledger import DEFAULT_MAX_PENDING_AUDIO_S, AudioLedger
from server.backend import InvalidRequest
from server.live_session import LiveSession
from server.livekit.avatar_protocol import AvatarProtocol
from server.livekit.publisher import LiveKitPublisher
from server.session_outputs import AsyncLoopThread, FileSessionOutput, LiveKitSessionOutput, PlayoutHooks
from server.speech_feed import SpeechFeed

_LIVEKIT_JOIN_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class LiveConfig:
    """How the backend runs sessions.

    ahead_s: generate a session's next chunk while its playout buffer holds less than this (seconds).
    video_bitrate: LiveKit encoder ceiling, bits/s.
    sync_probe: paint frames with loud audio white (A/V offset measurements; off in production).
    video_delay_frames: LiveKit video sent this many frames after its audio (receive-path compensation).
    decode: the sessions' ``DecodeSession`` options (``--vae-*``; autocast follows ``--dtype`` by default).
    degrade: deadline-aware degradation (``--degrade*``, ``engine.degrade``).
    max_pending_audio_s: a session's cap on pending audio (accepted, not yet played), seconds
        (``--max-pending-audio-s``; ``server.audio_ledger``); None: no cap.
    """

    model: ModelConfig
    stream: StreamConfig
    seed: int = 0
    default_prompt: str = "a person talking"
    ahead_s: float = 0.75
    video_bitrate: int = 1_000_000
    sync_probe: bool = False
    video_delay_frames: int = 1
    wav2vec_checkpoint: str | None = None
    encoder_seed: int | None = None  # the tiny random wav2vec2's seed (None: `seed`)
    # The sessions' decode options; the backend's VAE must be prepared for them (`DecodeOptions.prepare`).
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    # Deadline-aware degradation (engine.degrade; off by default).
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    max_batch_sessions: int = 1  # --max-batch-sessions: due sessions' chunks scored together (1: off)
    max_pending_audio_s: float | None = DEFAULT_MAX_PENDING_AUDIO_S


class SessionSetup:
    """Builds sessions for a backend: the server's audio front-end (wav2vec2, built once) and its VAE,
    encoders and asyncio loop."""

    def __init__(
        self,
        config: LiveConfig,
        vae: WanVAE,
        encoders: ConditioningEncoders,
        loop: AsyncLoopThread,
        audio_observer: Callable[[str, float], None] | None = None,
    ) -> None:
        """audio_observer: told how many seconds of each session's accepted audio played or were dropped
        (``AudioLedger``'s observer: the server's metrics)."""
        self.config = config
        self.audio_observer = audio_observer
        self.vae = vae
        self.encoders = encoders
        self.loop = loop
        self.infinitetalk: InfiniteTalkAudio | None = None
        tiny_seed = config.seed if config.encoder_seed is None else config.encoder_seed
        audio = config.model.audio
        if config.model.audio_variant == "infinitetalk":
            assert isinstance(audio, ModelAudio)
            self.infinitetalk = build_front_end(audio, config.stream, config.wav2vec_checkpoint, tiny_seed)
        else:
            self.featurizer_config, self.wav2vec, self.normalize = self._audio_front_end(config, tiny_seed)

    @staticmethod
    def _audio_front_end(config: LiveConfig, tiny_seed: int) -> tuple[AudioFeaturizerConfig, Any, bool]:
        grid = {"fps": config.stream.fps, "chunk_latents": config.stream.chunk_latent_frames}
        common = {"checkpoint": config.wav2vec_checkpoint, "tiny_seed": tiny_seed, **grid}
        audio = config.model.audio
        cfg = AudioFeaturizerConfig(**common) if audio is None else featurizer_config_for(audio, **common)
        model, normalize = build_wav2vec2(cfg)
        cfg = replace(cfg, normalize=normalize)
        if audio is not None:
            check_matches(AudioFeaturizer(cfg, model=model), audio)
        return cfg, model, normalize

    def featurizer(self) -> AudioFeaturizer | StreamChunkAudio:
        """A featurizer sharing the server's wav2vec2 (used by the engine thread only)."""
        if self.infinitetalk is not None:
            return StreamChunkAudio(self.infinitetalk, self.config.stream)
        return AudioFeaturizer(self.featurizer_config, model=self.wav2vec)

    def build(
        self, session_id: str, image: np.ndarray, faces: list[Face], prompt: str, speaking: Sequence[int]
    ) -> tuple[LiveSession, SessionOpen, dict[str, torch.Tensor]]:
        """A new session's state (I2V conditioning, featurizers, decoder) and its ``SessionOpen``.

        Raises:
            InvalidRequest: more characters than the model family animates (the InfiniteTalk family: one).
        """
        model, stream = self.config.model, self.config.stream
        if model.audio_variant == "infinitetalk" and len(faces) > 1:
            raise InvalidRequest(
                f"preset {model.name!r} animates one character (the InfiniteTalk audio module's "
                f"single-speaker path); the session has {len(faces)}: send one character"
            )
        image = reference_image(model, stream, image)
        conditioning = None
        if model.has_image_branch:
            conditioning = I2VConditioning.for_stream(self.vae, image, stream)
        message, tensors = session_open(
            session_id, model, stream, self.encoders, prompt, image, [f.box_norm for f in faces]
        )
        ledger = AudioLedger(self.config.max_pending_audio_s, name=session_id, observer=self.audio_observer)
        feed = SpeechFeed([self.featurizer() for _ in faces], list(speaking), fps=stream.fps, ledger=ledger)
        session = LiveSession(
            session_id,
            model,
            stream,
            feed,
            conditioning,
            self.config.decode.session(self.vae, stream.height, stream.width),
            seed=self.config.seed,
            sync_probe=self.config.sync_probe,
        )
        return session, message, tensors

    def attach_output(
        self, session: LiveSession, output: Output, on_clear_request: Callable[[], None]
    ) -> str | None:
        """Give ``session`` its output (a LiveKit room joined now, or an MP4 file); the LiveKit identity.

        Raises:
            InvalidRequest: the LiveKit room could not be joined.
        """
        identity: str | None = None
        hooks = PlayoutHooks(on_frame=session.on_frame, on_clear=session.on_clear)
        stream = self.config.stream
        if isinstance(output, LiveKitOutput):
            assert output.token is not None  # the API mints one when the caller sent none
            publisher = LiveKitPublisher(
                output.url,
                output.token.get_secret_value(),
                stream.width,
                stream.height,
                fps=stream.fps,
                sample_rate=session.feed.output_rate,
                video_bitrate=self.config.video_bitrate,
            )
            protocol = AvatarProtocol(agent_identity=output.agent_identity)
            session.protocol = protocol
            live_output = LiveKitSessionOutput(
                self.loop,
                publisher,
                protocol,
                hooks,
                session.feed,
                on_clear_request,
                video_delay_frames=self.config.video_delay_frames,
            )
            try:
                self.loop.submit(live_output.start()).result(timeout=_LIVEKIT_JOIN_TIMEOUT_S)
            except Exception as exc:
                raise InvalidRequest(
                    f"could not join LiveKit room {output.room!r} at {output.url}: {exc}"
                ) from exc
            session.output = live_output
            identity = output.identity
        else:
            assert isinstance(output, FileOutput)
            session.output = FileSessionOutput(
                Path(output.path), stream.width, stream.height, stream.fps, hooks, session.feed.output_rate
            )
        return identity

"""One live call of ``talkingmachines serve`` (``LiveSession``): its lifecycle, its chunk inputs and what it
reports as its frames play.

Its audio clock is a ``server.speech_feed.SpeechFeed`` (speech fed to the featurizers just in time, silence
where none came); its frames go to a ``server.session_outputs`` output (a LiveKit room or an MP4 file), which
calls back ``on_frame`` as each frame plays (first-frame latency, the avatar protocol's playback reports) and
``on_clear`` on a barge-in.

Barge-in (``clear``): the pending speech is dropped, the look-ahead already fed to the featurizers is zeroed
(so no old speech leaks into the next chunk), and the output drops every frame not yet played; the KV
history on the workers carries on, so the next chunk continues the same video.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from decoder.encode import I2VConditioning
from decoder.streaming import DecodeSession
from engine.chunks import PreparedInputs, SessionTimes, chunk_request
from proto.api import SessionState
from proto.chunk_specs import chunk_request_specs
from proto.model_config import ModelConfig
from proto.stream_config import StreamConfig
from server.livekit.avatar_protocol import AvatarProtocol
from server.session_outputs import SessionOutput
from server.speech_feed import SpeechFeed

# A frame whose paired audio is louder than this (RMS, full scale 1) is painted white by the sync probe.
PROBE_RMS = 0.25


class LiveSession:
    """State of one call: inputs, decode state, output, and its lifecycle (starting → running → ended/failed).

    Args:
        session_id: the API id; also the workers' session id.
        model, stream: the serving group's model preset and stream configuration.
        feed: the session's audio clock and featurizers (one per character).
        conditioning: the I2V ``y`` source (i2v presets) or None.
        decoder: the session's streaming VAE decode state.
        seed: the session's noise seed (chunk seeds derive from it).
        sync_probe: paint frames whose audio is loud (RMS > ``PROBE_RMS``) white, to measure A/V offset.
    """

    def __init__(
        self,
        session_id: str,
        model: ModelConfig,
        stream: StreamConfig,
        feed: SpeechFeed,
        conditioning: I2VConditioning | None,
        decoder: DecodeSession,
        seed: int,
        sync_probe: bool = False,
    ) -> None:
        self.id = session_id
        self.model = model
        self.stream = stream
        self.feed = feed
        self.conditioning = conditioning
        self.decoder = decoder
        self.seed = seed
        self.sync_probe = sync_probe
        self.num_characters = len(feed.featurizers)
        self.output: SessionOutput | None = None
        self.protocol: AvatarProtocol | None = None
        self.state = SessionState.starting
        self.reason: str | None = None
        self.chunks_generated = 0
        self.times = SessionTimes()
        self.first_frame_observer: Callable[[float], None] | None = None
        # Bumped by every clear: a chunk prepared before a clear is dropped instead of published after it.
        self.epoch = 0

    @property
    def live(self) -> bool:
        return self.state in (SessionState.starting, SessionState.running)

    def prepare_chunk(self) -> PreparedInputs:
        """The next chunk's request: features for its window (fed just in time), ``y``, speaking flags."""
        index, audio, pcm = self.feed.take_chunk()
        specs = chunk_request_specs(self.model, self.stream, self.num_characters, index)
        request, tensors = chunk_request(self.id, index, self.seed, specs, audio, self.conditioning)
        first = self.feed.featurizers[0].output_frames(index).start
        return PreparedInputs(request, tensors, pcm, first)

    def probe(self, frames: np.ndarray, pcm: np.ndarray) -> np.ndarray:
        """With the sync probe on, frames whose own audio is loud become white (else unchanged)."""
        if not self.sync_probe:
            return frames
        spf = self.feed.output_spf
        rms = np.sqrt(np.mean(pcm[: frames.shape[0] * spf].reshape(frames.shape[0], spf) ** 2, axis=1))
        if not (rms > PROBE_RMS).any():
            return frames
        frames = frames.copy()
        frames[rms > PROBE_RMS] = 255
        return frames

    def request_clear(self) -> None:
        """Barge-in (the API's ``clear``, the avatar protocol's): the output drops every frame not yet played
        and reports the first one dropped back through ``on_clear``."""
        if self.output is not None:
            self.output.clear()

    # ---- playout hooks (called by the output as frames play) --------------------------------------------

    def on_frame(self, index: int) -> None:
        """Frame ``index`` (absolute) was just published: first-frame latency, protocol reports, and the
        accepted speech up to its end counted as played."""
        with self.feed.lock:
            self._report_played(index)
            self.feed.mark_played(index + 1)

    def _report_played(self, index: int) -> None:
        frame_end = self.feed.frame_sample(index + 1)
        utterances = self.feed.utterances
        while (
            utterances and utterances[0].start_sample is not None and utterances[0].start_sample < frame_end
        ):
            latency = time.perf_counter() - utterances.popleft().arrived_at
            self.times.first_frame_latency_s = latency
            if self.first_frame_observer is not None:
                self.first_frame_observer(latency)
        if self.protocol is None:
            return
        segments = self.feed.segments
        for segment in list(segments):
            if segment.start_sample is None or segment.start_sample >= frame_end:
                break
            if not segment.started_sent:
                segment.started_sent = True
                self.protocol.playback_started()
        while segments:
            head = segments[0]
            done = (
                head.received_all
                and head.pending_samples == 0
                and head.end_sample is not None
                and head.end_sample <= frame_end
            )
            if not done:
                break
            segments.popleft()
            # the agent's audio played, not the span: silence that filled an underrun mid-segment is not its
            played = head.fed_samples / self.feed.sample_rate
            self.protocol.playback_finished(played, interrupted=False)

    def on_clear(self, first_unplayed: int) -> None:
        """The output dropped every frame from ``first_unplayed`` on: drop speech, report interruptions."""
        self.epoch += 1
        dropped = self.feed.clear(first_unplayed)
        if self.protocol is None:
            return
        played_to = self.feed.frame_sample(first_unplayed)
        position = 0.0
        if dropped:  # the agent's audio played before the cut, not the span (as playback_finished reports)
            position = dropped[0].own_samples_before(played_to) / self.feed.sample_rate
        if dropped or self.protocol.pending_segments:
            self.protocol.playback_finished(position, interrupted=True)

"""An offline echo agent: a LiveKit participant of kind ``agent`` driving our avatar with no cloud service.

It speaks a WAV file to the avatar, and/or echoes the user's own microphone back through the avatar after
each pause, over the standard avatar-worker protocol (``DataStreamAudioOutput`` from livekit-agents: one
``lk.audio_stream`` byte stream per utterance, ``lk.playback_finished`` back). So a whole call - browser,
LiveKit, agent, avatar - runs on one machine without an LLM, TTS or network access::

    LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=devsecret-local-use-only-0123456789abcdef \\
    TALKINGMACHINES_API_KEY=dev-api-key python -m deploy.agent.echo_agent \\
        --url ws://127.0.0.1:7880 --room demo --wav examples/speech.wav \\
        --api-url http://127.0.0.1:8000 --image examples/portrait.png

(the dev credentials and addresses of README's "A first call on one machine": livekit-server with
``deploy/livekit/livekit-local.yaml``, ``talkingmachines serve --config deploy/serve.dev.toml``).

``--api-url``/``--image`` ask our server for the avatar (``POST /v1/sessions``, ended with ``DELETE`` on
exit); without them the agent expects an avatar that was started some other way. ``--wav`` speaks the file
once (``--repeat-every S`` again every S seconds); the microphone echo is on unless ``--no-echo``.

For tests and other tools, :func:`stream_wav_to_avatar` streams a WAV to the avatar given a connected
``rtc.Room``. Needs the ``agent`` extra (``livekit-agents``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from livekit import api, rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent

from server.livekit.agent_plugin import SAMPLE_RATE, aiohttp_request
from server.livekit.token import DEFAULT_AVATAR_IDENTITY, mint_avatar_token

logger = logging.getLogger("echo_agent")

AGENT_IDENTITY = "echo-agent"
ATTRIBUTE_AGENT_STATE = "lk.agent.state"
FRAME_MS = 100  # audio pushed per capture_frame, as a TTS stream would


def load_wav(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sound file (WAV, FLAC, OGG; any rate and channels) as ``[N]`` int16 mono at ``sample_rate`` Hz."""
    try:
        data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot read audio file {str(path)!r}: {exc}") from exc
    if data.size == 0:
        raise ValueError(f"audio file {str(path)!r} holds no samples")
    mono = data.mean(axis=1).round().astype(np.int16)
    if rate == sample_rate:
        return mono
    resampler = rtc.AudioResampler(rate, sample_rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
    frames = resampler.push(rtc.AudioFrame(mono.tobytes(), rate, 1, mono.size)) + resampler.flush()
    return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])


def agent_token(api_key: str, api_secret: str, room: str, identity: str = AGENT_IDENTITY) -> str:
    """A token to join ``room`` as a participant of kind ``agent`` that may set its own attributes."""
    grants = api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True)
    return (
        api.AccessToken(api_key, api_secret)
        .with_kind("agent")
        .with_identity(identity)
        .with_name(identity)
        .with_grants(grants)
        .to_jwt()
    )


def avatar_output(
    room: rtc.Room,
    *,
    avatar_identity: str = DEFAULT_AVATAR_IDENTITY,
    wait_for_video: bool = True,
    clear_buffer_timeout: float | None = 2.0,
) -> DataStreamAudioOutput:
    """The agent-side audio sink that streams to the avatar (what ``AvatarSession`` installs in a voice
    agent). ``wait_for_video``: hold the first audio until the avatar publishes its video track."""
    return DataStreamAudioOutput(
        room,
        destination_identity=avatar_identity,
        sample_rate=SAMPLE_RATE,
        wait_remote_track=rtc.TrackKind.KIND_VIDEO if wait_for_video else None,
        clear_buffer_timeout=clear_buffer_timeout,
    )


async def speak(output: DataStreamAudioOutput, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Stream ``pcm`` (``[N]`` int16 mono) as one utterance: 100 ms frames, faster than real time, then the
    end of the segment. Returns once everything is sent; playout is awaited with ``wait_for_playout()``."""
    step = sample_rate * FRAME_MS // 1000
    for start in range(0, pcm.size, step):
        piece = np.ascontiguousarray(pcm[start : start + step])
        await output.capture_frame(rtc.AudioFrame(piece.tobytes(), sample_rate, 1, piece.size))
    output.flush()


async def stream_wav_to_avatar(
    room: rtc.Room,
    wav: Path,
    *,
    avatar_identity: str = DEFAULT_AVATAR_IDENTITY,
    wait_for_video: bool = True,
    playout_timeout_s: float = 60.0,
) -> PlaybackFinishedEvent:
    """Speak ``wav`` to the avatar in ``room`` (connected, as the avatar's agent) and wait for its playout.

    Returns the avatar's ``lk.playback_finished`` report (position in seconds, interrupted or not).

    Raises:
        ValueError: the file cannot be read.
        TimeoutError: the avatar did not report the end of playout within ``playout_timeout_s``.
    """
    pcm = load_wav(wav)
    output = avatar_output(room, avatar_identity=avatar_identity, wait_for_video=wait_for_video)
    await speak(output, pcm)
    try:
        return await asyncio.wait_for(output.wait_for_playout(), timeout=playout_timeout_s)
    except TimeoutError:
        raise TimeoutError(
            f"avatar {avatar_identity!r} did not report playback_finished within {playout_timeout_s} s of "
            f"{pcm.size / SAMPLE_RATE:.2f} s of audio from {str(wav)!r} - is it in the room and playing?"
        ) from None


class UtteranceDetector:
    """Cuts a microphone stream into utterances at pauses (an energy gate; no model needed).

    Feed ``[N]`` int16 mono frames at ``sample_rate``; :meth:`push` returns a finished utterance (speech
    plus up to ``pause_s`` of trailing silence) once ``pause_s`` of silence follows at least ``min_speech_s``
    of speech, or once the utterance reaches ``max_speech_s``.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        *,
        threshold_dbfs: float = -40.0,
        pause_s: float = 0.7,
        min_speech_s: float = 0.25,
        max_speech_s: float = 15.0,
    ) -> None:
        self._rate = sample_rate
        self._threshold = 32768.0 * 10 ** (threshold_dbfs / 20)
        self._pause = int(pause_s * sample_rate)
        self._min_speech = int(min_speech_s * sample_rate)
        self._max = int(max_speech_s * sample_rate)
        self._frames: list[np.ndarray] = []
        self._speech = 0
        self._silence = 0

    def push(self, frame: np.ndarray) -> np.ndarray | None:
        rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) if frame.size else 0.0
        loud = rms >= self._threshold
        if not self._frames and not loud:
            return None
        self._frames.append(frame)
        if loud:
            self._speech += frame.size
            self._silence = 0
        else:
            self._silence += frame.size
        total = self._speech + self._silence
        paused = self._silence >= self._pause
        if (paused or total >= self._max) and self._speech >= self._min_speech:
            return self._take()
        if paused:  # a click or a cough: too short to echo
            self.reset()
        return None

    def _take(self) -> np.ndarray:
        utterance = np.concatenate(self._frames)
        self.reset()
        return utterance

    def reset(self) -> None:
        """Drop the utterance in progress."""
        self._frames, self._speech, self._silence = [], 0, 0


class EchoAgent:
    """Speaks a WAV and/or echoes the user's microphone to the avatar, one utterance at a time."""

    def __init__(self, room: rtc.Room, output: DataStreamAudioOutput) -> None:
        self._room = room
        self._output = output
        self._speaking = asyncio.Lock()

    async def say(self, pcm: np.ndarray) -> None:
        async with self._speaking:
            await self._set_state("speaking")
            try:
                await speak(self._output, pcm)
                finished = await self._output.wait_for_playout()
                logger.info(
                    "avatar played %.2f s of a %.2f s utterance%s",
                    finished.playback_position,
                    pcm.size / SAMPLE_RATE,
                    " (interrupted)" if finished.interrupted else "",
                )
            finally:
                await self._set_state("listening")

    async def echo_microphone(self, detector: UtteranceDetector) -> None:
        """Echo every utterance of the first user microphone track that appears (runs until cancelled)."""
        track = await self._user_microphone()
        logger.info("echoing the microphone of %s", track.sid)
        stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1)
        replies: set[asyncio.Task[None]] = set()
        try:
            async for event in stream:
                if self._speaking.locked():
                    # The user is hearing the avatar; what the microphone picks up now is not a new turn.
                    detector.reset()
                    continue
                utterance = detector.push(np.frombuffer(event.frame.data, dtype=np.int16))
                if utterance is not None:
                    logger.info("echoing %.2f s of speech", utterance.size / SAMPLE_RATE)
                    reply = asyncio.create_task(self.say(utterance))
                    replies.add(reply)
                    reply.add_done_callback(replies.discard)
                    await asyncio.sleep(0)  # let the reply take the speaking lock before the next frame
        finally:
            for reply in replies:
                reply.cancel()
            await stream.aclose()

    async def _user_microphone(self) -> rtc.RemoteAudioTrack:
        found: asyncio.Future[rtc.RemoteAudioTrack] = asyncio.get_running_loop().create_future()

        def consider(track: rtc.Track, participant: rtc.RemoteParticipant) -> None:
            is_user = participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            if is_user and isinstance(track, rtc.RemoteAudioTrack) and not found.done():
                found.set_result(track)

        self._room.on("track_subscribed", lambda track, _pub, participant: consider(track, participant))
        for participant in self._room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    consider(publication.track, participant)
        return await found

    async def _set_state(self, state: str) -> None:
        # The avatar reads lk.agent.state (listening -> a listening pose); a refused update is harmless.
        with contextlib.suppress(Exception):
            await self._room.local_participant.set_attributes({ATTRIBUTE_AGENT_STATE: state})


async def start_avatar_session(
    *,
    api_url: str,
    api_key: str,
    image: Path,
    livekit_url: str,
    room: str,
    agent_identity: str,
    livekit_api_key: str,
    livekit_api_secret: str,
    avatar_identity: str = DEFAULT_AVATAR_IDENTITY,
    prompt: str | None = None,
) -> str:
    """Ask our server to put the avatar into ``room`` for ``agent_identity``; returns the session id."""
    token = mint_avatar_token(
        api_key=livekit_api_key,
        api_secret=livekit_api_secret,
        room=room,
        identity=avatar_identity,
        agent_identity=agent_identity,
    )
    body: dict[str, object] = {
        "image": base64.b64encode(image.read_bytes()).decode(),
        "output": {
            "type": "livekit",
            "url": livekit_url,
            "room": room,
            "identity": avatar_identity,
            "agent_identity": agent_identity,
            "token": token,
        },
    }
    if prompt:
        body["prompt"] = prompt
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = await aiohttp_request("POST", f"{api_url.rstrip('/')}/v1/sessions", body, headers)
    return str(response.get("session_id") or response["id"])


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.agent.echo_agent", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit URL (env LIVEKIT_URL)")
    parser.add_argument("--room", required=True, help="room to join")
    parser.add_argument("--identity", default=AGENT_IDENTITY, help="this agent's identity")
    parser.add_argument("--avatar-identity", default=DEFAULT_AVATAR_IDENTITY, help="the avatar's identity")
    parser.add_argument("--wav", type=Path, help="speak this file once the avatar's video is up")
    parser.add_argument("--repeat-every", type=float, default=None, help="seconds between repeats of --wav")
    parser.add_argument("--no-echo", action="store_true", help="do not echo the user's microphone")
    parser.add_argument("--api-url", default=os.environ.get("TALKINGMACHINES_API_URL"), help="our server")
    parser.add_argument("--image", type=Path, help="reference portrait for the avatar (with --api-url)")
    parser.add_argument("--prompt", default=None, help="text prompt for the avatar session")
    return parser


async def _run(args: argparse.Namespace) -> int:
    key, secret = os.environ.get("LIVEKIT_API_KEY"), os.environ.get("LIVEKIT_API_SECRET")
    if not (args.url and key and secret):
        logger.error("set --url (or LIVEKIT_URL), LIVEKIT_API_KEY and LIVEKIT_API_SECRET")
        return 2
    room = rtc.Room()
    await room.connect(args.url, agent_token(key, secret, args.room, args.identity))
    logger.info("joined room %s as %s", args.room, args.identity)
    session_id = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.api_url:
            session_id = await start_avatar_session(
                api_url=args.api_url,
                api_key=os.environ.get("TALKINGMACHINES_API_KEY", ""),
                image=args.image,
                livekit_url=args.url,
                room=args.room,
                agent_identity=args.identity,
                livekit_api_key=key,
                livekit_api_secret=secret,
                avatar_identity=args.avatar_identity,
                prompt=args.prompt,
            )
            logger.info("avatar session %s started", session_id)
        agent = EchoAgent(room, avatar_output(room, avatar_identity=args.avatar_identity))
        tasks = [asyncio.create_task(stop.wait())]
        if not args.no_echo:
            tasks.append(asyncio.create_task(agent.echo_microphone(UtteranceDetector())))
        if args.wav is not None:
            tasks.append(asyncio.create_task(_speak_file(agent, args.wav, args.repeat_every)))
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # re-raise a failure of the WAV or echo task
        return 0
    finally:
        if session_id is not None:
            headers = {"Authorization": f"Bearer {os.environ.get('TALKINGMACHINES_API_KEY', '')}"}
            url = f"{args.api_url.rstrip('/')}/v1/sessions/{session_id}"
            with contextlib.suppress(Exception):  # the server may already have ended it
                await aiohttp_request("DELETE", url, None, headers)
        await room.disconnect()


async def _speak_file(agent: EchoAgent, wav: Path, repeat_every: float | None) -> None:
    pcm = load_wav(wav)
    while True:
        await agent.say(pcm)
        if repeat_every is None:
            await asyncio.Event().wait()  # spoken once; keep the call (and the echo) going
        await asyncio.sleep(repeat_every)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.api_url and args.image is None:
        parser.error("--api-url needs --image (the avatar's reference portrait)")
    if args.wav is None and args.no_echo:
        parser.error("nothing to do: give --wav, or leave the microphone echo on")
    if args.wav is not None:
        load_wav(args.wav)  # fail before joining when the file is unreadable
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())

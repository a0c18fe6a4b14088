"""First-frame latency and A/V offset of ``talkingmachines serve`` at a real LiveKit subscriber.

Set-up (all on this machine): a ``livekit-server --dev`` on loopback (tests/livekit/conftest.py's
``LiveKitServer``), ``talkingmachines serve`` as a real process (tiny preset, colocated single-rank group,
``--sync-probe``: frames whose own audio is loud are painted white), a LiveKit agent speaking through
livekit-agents' ``DataStreamAudioOutput`` (exactly what a voice agent installs), and a subscriber using the
``livekit`` SDK that timestamps every ``avatar_video`` frame and every 10 ms of ``avatar_audio``.

Each trial, after the session has idled in silence mode, the agent sends a 3 s clip whose first video frame
is a loud beep, then one beep every 0.5 s. Measured per trial:

- ``subscriber_first_frame_s``: agent starts sending → the subscriber receives the first white frame (the
  frame paired with the clip's first audio): audio in → first frame received, end to end;
- ``subscriber_first_audio_s``: agent starts sending → the subscriber hears the first beep;
- ``server_first_frame_s``: the server's own ``first_frame_latency_s`` (audio in → first frame published);
- ``av_offsets_s``: for each beep, white-frame arrival minus beep-onset arrival (positive: video late).

Usage: ``python -m benchmarks.livekit_latency --out benchmarks/results/livekit_latency_cpu.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from livekit import api, rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

from benchmarks.provenance import provenance
from server.livekit.publisher import AUDIO_TRACK_NAME, VIDEO_TRACK_NAME
from server.livekit.token import mint_avatar_token
from tests.livekit.conftest import LiveKitServer, find_livekit_server
from tests.serve.conftest import AUTH, ServeProcess, portrait_base64, start_serve

RATE, FPS = 16000, 16
SPF = RATE // FPS
AVATAR, AGENT = "tm-avatar", "voice-agent"
LOUD_LUMA, LOUD_RMS = 200.0, 0.25


def beep_clip(seconds: float = 3.0, every_s: float = 0.5) -> np.ndarray:
    """int16: silence with a loud 1 kHz frame (1/16 s) at 0 s and every ``every_s`` after."""
    pcm = np.zeros(int(seconds * RATE), np.float32)
    t = np.arange(SPF) / RATE
    for start in range(0, pcm.size - SPF, int(every_s * RATE)):
        pcm[start : start + SPF] = 0.8 * np.sin(2 * np.pi * 1000 * t)
    return (pcm * 32767).astype(np.int16)


class Recorder:
    """Subscriber: (perf_counter, mean luma) per video frame, (perf_counter, rms) per 10 ms of audio."""

    def __init__(self) -> None:
        self.video: list[tuple[float, float]] = []
        self.audio: list[tuple[float, float]] = []
        self.size: tuple[int, int] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def attach(self, room: rtc.Room) -> None:
        @room.on("track_subscribed")
        def _on_track(track: rtc.Track, publication: rtc.RemoteTrackPublication, _: object) -> None:
            if publication.name == VIDEO_TRACK_NAME:
                self.tasks.append(asyncio.create_task(self._video(track)))
            elif publication.name == AUDIO_TRACK_NAME:
                self.tasks.append(asyncio.create_task(self._audio(track)))

    async def _video(self, track: rtc.Track) -> None:
        async for event in rtc.VideoStream(track, format=rtc.VideoBufferType.I420):
            frame = event.frame
            self.size = (frame.width, frame.height)
            luma = np.frombuffer(frame.data, np.uint8)[: frame.width * frame.height]
            self.video.append((time.perf_counter(), float(luma.mean())))

    async def _audio(self, track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=RATE, num_channels=1, frame_size_ms=10):
            pcm = np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768.0
            self.audio.append((time.perf_counter(), float(np.sqrt(np.mean(pcm**2)))))


def _rising(samples: list[tuple[float, float]], threshold: float, lo: float, hi: float) -> list[float]:
    return [
        t
        for i, (t, v) in enumerate(samples)
        if lo <= t <= hi and v > threshold and (i == 0 or samples[i - 1][1] <= threshold)
    ]


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "count": len(values),
    }


async def measure(server: ServeProcess, lk_url: str, trials: int, idle_s: float) -> dict[str, Any]:
    room_name = f"bench-{uuid.uuid4().hex[:8]}"
    agent_token = (
        api.AccessToken("devkey", "secret")
        .with_kind("agent")
        .with_identity(AGENT)
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    viewer_token = (
        api.AccessToken("devkey", "secret")
        .with_identity("viewer")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    agent_room, viewer = rtc.Room(), rtc.Room()
    recorder = Recorder()
    recorder.attach(viewer)
    await agent_room.connect(lk_url, agent_token)
    await viewer.connect(lk_url, viewer_token)
    output = DataStreamAudioOutput(
        agent_room,
        destination_identity=AVATAR,
        sample_rate=RATE,
        wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        wait_playback_start=True,
    )
    token = mint_avatar_token(
        api_key="devkey", api_secret="secret", room=room_name, identity=AVATAR, agent_identity=AGENT
    )
    rows: list[dict[str, Any]] = []
    clip = beep_clip()
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
        created = await http.post(
            "/v1/sessions",
            json={
                "image": portrait_base64(),
                "output": {
                    "type": "livekit",
                    "url": lk_url,
                    "room": room_name,
                    "identity": AVATAR,
                    "agent_identity": AGENT,
                    "token": token,
                },
            },
        )
        created.raise_for_status()
        session_id = created.json()["id"]
        try:
            for trial in range(trials):
                # Vary where the utterance lands relative to the chunk grid and the playout buffer.
                await asyncio.sleep(idle_s + 0.137 * trial)
                sent = time.perf_counter()
                for start in range(0, clip.size, RATE // 10):
                    piece = clip[start : start + RATE // 10]
                    await output.capture_frame(rtc.AudioFrame(piece.tobytes(), RATE, 1, piece.size))
                output.flush()
                finished = await asyncio.wait_for(output.wait_for_playout(), timeout=30)
                await asyncio.sleep(0.5)
                end = time.perf_counter()
                flashes = _rising(recorder.video, LOUD_LUMA, sent, end)
                onsets = _rising(recorder.audio, LOUD_RMS, sent, end)
                offsets = []
                for t_video in flashes:
                    nearest = min(onsets, key=lambda t_audio: abs(t_audio - t_video), default=None)
                    if nearest is not None and abs(nearest - t_video) < 0.25:
                        offsets.append(t_video - nearest)
                info = (await http.get(f"/v1/sessions/{session_id}")).json()
                rows.append(
                    {
                        "trial": trial,
                        "subscriber_first_frame_s": flashes[0] - sent if flashes else None,
                        "subscriber_first_audio_s": onsets[0] - sent if onsets else None,
                        "server_first_frame_s": info["first_frame_latency_s"],
                        "av_offsets_s": offsets,
                        "playback_finished": {
                            "position_s": finished.playback_position,
                            "interrupted": finished.interrupted,
                        },
                    }
                )
                print(f"trial {trial}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            final = (await http.get(f"/v1/sessions/{session_id}")).json()
            metrics = (await http.get("/metrics")).text
        finally:
            await http.delete(f"/v1/sessions/{session_id}")
    await viewer.disconnect()
    await agent_room.disconnect()
    for task in recorder.tasks:
        task.cancel()
    await asyncio.gather(*recorder.tasks, return_exceptions=True)
    offsets_all = [o for row in rows for o in row["av_offsets_s"]]
    av_line = next((line for line in metrics.splitlines() if line.startswith("tm_av_offset_seconds ")), None)
    return {
        "subscriber_video_size": list(recorder.size) if recorder.size else None,
        "trials": rows,
        "summary": {
            "subscriber_first_frame_s": _summary(
                [r["subscriber_first_frame_s"] for r in rows if r["subscriber_first_frame_s"] is not None]
            ),
            "subscriber_first_audio_s": _summary(
                [r["subscriber_first_audio_s"] for r in rows if r["subscriber_first_audio_s"] is not None]
            ),
            "server_first_frame_s": _summary(
                [r["server_first_frame_s"] for r in rows if r["server_first_frame_s"] is not None]
            ),
            "subscriber_av_offset_s": _summary(offsets_all),
            "publisher_av_offset_last_s": float(av_line.split()[1]) if av_line else None,
        },
        "session_ttbc": final["ttbc"],
        "chunks_generated": final["chunks_generated"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.livekit_latency", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of silence mode before each trial")
    parser.add_argument("--resolution", default="32x32")
    args = parser.parse_args(argv)
    binary = find_livekit_server()
    if binary is None:
        parser.error("no livekit-server binary: install it with deploy/install_livekit_server.sh")

    def free(kind: int) -> int:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sfu = LiveKitServer(binary, free(socket.SOCK_STREAM), free(socket.SOCK_DGRAM), tmp / "livekit.log")
        sfu.start()
        serve_args = ("--decoder", "colocated", "--resolution", args.resolution, "--sync-probe")
        server = start_serve(tmp, *serve_args)
        try:
            result = asyncio.run(measure(server, sfu.url, args.trials, args.idle))
        finally:
            server.stop()
            sfu.stop()
    document = {
        **provenance("benchmarks.livekit_latency", argv if argv is not None else sys.argv[1:]),
        "setup": {
            "preset": "tiny (seeded random weights)",
            "resolution": args.resolution,
            "topology": "self-contained 1 (colocated, one process)",
            "serve_args": [*serve_args, "--threads", "1", "--device", "cpu"],
            "livekit_server": "livekit-server --dev on loopback",
            "agent": "livekit-agents DataStreamAudioOutput, 16 kHz",
            "ahead_s": 0.5,
            "video_delay_frames": 1,
            "notes": "first-frame latency includes the playout buffer (<= ahead + one chunk of silence video "
            "queued when speech arrives), the 0.5 s audio look-ahead of the wav2vec2 window, one chunk's "
            "generation, and the LiveKit path; A/V offset is white probe frame minus beep onset at the "
            "subscriber (positive: video late). The Python SDK subscriber timestamps arrivals, does no A/V "
            "lip-sync of its own (a browser does, from RTCP sender reports), so its audio jitter buffer's "
            "adaptation shows up directly: across runs on this machine each trial's offsets sat near +30 ms, "
            "except one run where half the trials sat near -88 ms (the subscriber's audio path holding "
            "~120 ms more); the median over all beeps stayed within one frame (62.5 ms)",
        },
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

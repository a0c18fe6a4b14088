"""A LiveKit Agents voice agent with a talkingmachines avatar, driven by a real audio LLM.

The agent is an ordinary LiveKit Agents worker. Its speech goes to our avatar instead of straight into the
room: ``server.livekit.agent_plugin.AvatarSession`` asks our server for an avatar session that joins the room
(on behalf of this agent) and routes the agent's audio to it over the avatar-worker protocol. The user sees
and hears the avatar; barge-in clears the avatar's buffer.

The LLM here is OpenAI's speech-to-speech realtime model through the LiveKit plugin, which is NOT a
dependency of this project; install it next to our ``agent`` extra, at the version matching livekit-agents::

    pip install "talkingmachines[agent]" "livekit-plugins-openai==1.8.9"

Any other LLM/STT/TTS combination of LiveKit Agents works the same way: only ``build_session`` changes.

Environment:
    LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET  the LiveKit server (also used to mint the avatar token)
    OPENAI_API_KEY                                     read by the OpenAI plugin
    TALKINGMACHINES_API_URL, TALKINGMACHINES_API_KEY   our server (one serving group) and its bearer key
    AVATAR_IMAGE                                       path of the avatar's reference portrait (PNG/JPEG)
    AVATAR_PROMPT                                      optional text prompt for the avatar

Run it with the LiveKit Agents CLI (``dev`` for local development, ``start`` in production)::

    python -m deploy.agent.voice_agent dev

The worker registers as ``talkingmachines-voice``; rooms get it through LiveKit agent dispatch (explicit
dispatch by that name, or a token's room configuration). Each worker drives ONE serving group (its
``TALKINGMACHINES_API_URL``) and reports that group's fullness as its load, so LiveKit dispatches new calls
only to workers whose group has room: scale out by running one worker per group (deploy/README.md).
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

from server.livekit.agent_plugin import AvatarSession

AGENT_NAME = "talkingmachines-voice"
INSTRUCTIONS = (
    "You are a friendly person on a video call. Keep answers short and conversational; you are speaking, "
    "not writing, so never use lists or markup."
)



def group_load() -> float:
    """1.0 when our serving group cannot take a call (``/readyz`` not 200: full, draining, down), else 0.0.

    LiveKit Agents polls this every few seconds; with ``load_threshold`` 0.5 a worker whose group is full
    stops receiving new jobs, and its running calls go on.
    """
    url = os.environ.get("TALKINGMACHINES_API_URL", "").rstrip("/")
    if not url:
        return 1.0
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return 0.0 if response.status == 200 else 1.0
    except (urllib.error.URLError, TimeoutError):
        return 1.0


server = AgentServer(load_fnc=group_load, load_threshold=0.5)


def avatar_session_request() -> dict[str, Any]:
    """The ``POST /v1/sessions`` body (without ``output``) from ``AVATAR_IMAGE`` and ``AVATAR_PROMPT``."""
    image = os.environ.get("AVATAR_IMAGE")
    if not image:
        raise RuntimeError("AVATAR_IMAGE is not set: point it at the avatar's reference portrait (PNG/JPEG)")
    path = Path(image)
    if not path.is_file():
        raise RuntimeError(f"AVATAR_IMAGE={image!r} is not a readable file")
    request: dict[str, Any] = {"image": base64.b64encode(path.read_bytes()).decode()}
    prompt = os.environ.get("AVATAR_PROMPT")
    if prompt:
        request["prompt"] = prompt
    return request


def build_session() -> AgentSession:
    """The conversation engine: OpenAI's realtime speech-to-speech model."""
    try:
        from livekit.plugins import openai
    except ImportError as exc:
        raise RuntimeError(
            "the OpenAI plugin is missing: pip install 'livekit-plugins-openai==1.8.9' (or swap in another "
            "LLM/TTS in deploy/agent/voice_agent.py build_session)"
        ) from exc
    # resume_false_interruption=False: the avatar's DataStreamAudioOutput cannot pause, only clear.
    return AgentSession(llm=openai.realtime.RealtimeModel(voice="alloy"), resume_false_interruption=False)


@server.rtc_session(agent_name=AGENT_NAME)
async def entrypoint(ctx: JobContext) -> None:
    """One call: connect, bring in the avatar, then start the conversation."""
    await ctx.connect()
    session = build_session()
    avatar = AvatarSession(session_request=avatar_session_request())
    # Starts our avatar in this room and routes the session's audio to it (the agent publishes no audio).
    await avatar.start(session, room=ctx.room)
    ctx.add_shutdown_callback(avatar.aclose)
    await session.start(agent=Agent(instructions=INSTRUCTIONS), room=ctx.room)
    await session.generate_reply(instructions="Greet the user briefly.")


if __name__ == "__main__":
    cli.run_app(server)

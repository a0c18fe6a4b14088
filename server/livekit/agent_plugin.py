"""Agent-side plugin: puts a talkingmachines avatar into any LiveKit Agents voice agent.

Usage inside an agent entrypoint (the same three lines as the commercial avatar plugins)::

    session = AgentSession(..., resume_false_interruption=False)  # DataStreamAudioOutput cannot pause
    avatar = AvatarSession(api_url="https://avatar.example.com", session_request={"prompt": ...})
    await avatar.start(session, room=ctx.room)
    await session.start(agent=..., room=ctx.room)

``start`` mints the avatar's token (kind ``agent``, ``lk.publish_on_behalf`` = this agent), asks our API to
start a session that joins the room with it (``POST {api_url}/v1/sessions``), and routes the agent's TTS
audio to the avatar with ``DataStreamAudioOutput`` instead of publishing it itself. This module needs the
``livekit-agents`` package; the avatar server itself does not.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.avatar import AvatarSession as _AgentsAvatarSession
from livekit.agents.voice.avatar import DataStreamAudioOutput

from server.livekit.token import DEFAULT_AVATAR_IDENTITY, mint_avatar_token

SAMPLE_RATE = 16000  # the model's audio rate; the agent resamples TTS to it, so the avatar never does

# (method, url, json body or None, headers) -> decoded JSON response; raises on a non-2xx answer.
HttpRequest = Callable[[str, str, Mapping[str, Any] | None, Mapping[str, str]], Awaitable[dict[str, Any]]]


class TalkingMachinesAPIError(RuntimeError):
    """The talkingmachines HTTP API refused or failed a request."""


async def aiohttp_request(
    method: str, url: str, body: Mapping[str, Any] | None, headers: Mapping[str, str]
) -> dict[str, Any]:
    """Default transport: one aiohttp request, JSON in and out."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, json=body, headers=dict(headers)) as response,
    ):
        text = await response.text()
        if response.status >= 300:
            raise TalkingMachinesAPIError(f"{method} {url} returned HTTP {response.status}: {text[:500]}")
        return await response.json(content_type=None) if text else {}


class AvatarSession(_AgentsAvatarSession):
    """A talkingmachines avatar for a LiveKit Agents ``AgentSession``.

    Args:
        api_url: base URL of the talkingmachines API (default: env ``TALKINGMACHINES_API_URL``).
        api_key: bearer API key (default: env ``TALKINGMACHINES_API_KEY``; may be empty when the server
            runs with authentication explicitly disabled).
        session_request: the rest of the ``POST /v1/sessions`` body (reference image, prompt, characters);
            ``output`` is filled in by this class.
        avatar_identity: the avatar participant's identity in the room.
        avatar_name: its display name.
        livekit_url, livekit_api_key, livekit_api_secret: where the avatar joins and how its token is
            signed (default: env ``LIVEKIT_URL``, ``LIVEKIT_API_KEY``, ``LIVEKIT_API_SECRET``).
        http_request: transport for the API calls; injectable for tests and custom clients.
        clear_buffer_timeout: seconds the agent waits for ``lk.playback_finished`` after a barge-in.
    """

    def __init__(
        self,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        session_request: Mapping[str, Any] | None = None,
        avatar_identity: str = DEFAULT_AVATAR_IDENTITY,
        avatar_name: str = "talkingmachines avatar",
        livekit_url: str | None = None,
        livekit_api_key: str | None = None,
        livekit_api_secret: str | None = None,
        http_request: HttpRequest = aiohttp_request,
        clear_buffer_timeout: float | None = 2.0,
    ) -> None:
        super().__init__()
        self._api_url = (api_url or os.environ.get("TALKINGMACHINES_API_URL") or "").rstrip("/")
        if not self._api_url:
            raise ValueError("talkingmachines API URL missing: pass api_url= or set TALKINGMACHINES_API_URL")
        self._api_key = api_key if api_key is not None else os.environ.get("TALKINGMACHINES_API_KEY", "")
        self._session_request = dict(session_request or {})
        if "output" in self._session_request:
            raise ValueError("session_request must not contain 'output'; AvatarSession fills it in")
        self._avatar_identity = avatar_identity
        self._avatar_name = avatar_name
        self._livekit_url = livekit_url
        self._livekit_api_key = livekit_api_key
        self._livekit_api_secret = livekit_api_secret
        self._http_request = http_request
        self._clear_buffer_timeout = clear_buffer_timeout
        self.session_id: str | None = None

    @property
    def avatar_identity(self) -> str:
        return self._avatar_identity

    @property
    def provider(self) -> str:
        return "talkingmachines"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        """Start the avatar in ``room`` (connected) and route ``agent_session``'s audio to it."""
        await super().start(agent_session, room)
        url = self._livekit_url or os.environ.get("LIVEKIT_URL")
        key = self._livekit_api_key or os.environ.get("LIVEKIT_API_KEY")
        secret = self._livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ValueError(
                "LiveKit URL, API key and secret are needed to mint the avatar's token: pass "
                "livekit_url=, livekit_api_key=, livekit_api_secret= or set LIVEKIT_URL, LIVEKIT_API_KEY, "
                "LIVEKIT_API_SECRET"
            )
        agent_identity = room.local_participant.identity
        token = mint_avatar_token(
            api_key=key,
            api_secret=secret,
            room=room.name,
            identity=self._avatar_identity,
            name=self._avatar_name,
            agent_identity=agent_identity,
        )
        body = {
            **self._session_request,
            "output": {
                "type": "livekit",
                "url": url,
                "room": room.name,
                "identity": self._avatar_identity,
                "agent_identity": agent_identity,
                "token": token,
            },
        }
        response = await self._http_request("POST", f"{self._api_url}/v1/sessions", body, self._headers())
        self.session_id = response.get("session_id") or response.get("id")
        agent_session.output.replace_audio_tail(
            DataStreamAudioOutput(
                room,
                destination_identity=self._avatar_identity,
                sample_rate=SAMPLE_RATE,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                clear_buffer_timeout=self._clear_buffer_timeout,
                wait_playback_start=True,
            )
        )

    async def aclose(self) -> None:
        """End our server-side session (freeing its caches), then leave as the base class does."""
        if self.session_id is not None:
            session_id, self.session_id = self.session_id, None
            await self._http_request(
                "DELETE", f"{self._api_url}/v1/sessions/{session_id}", None, self._headers()
            )
        await super().aclose()

"""Access tokens for the avatar participant (livekit-api).

The avatar joins the agent's room as a participant of kind ``agent`` whose attribute ``lk.publish_on_behalf``
names the voice agent. That pairing is what makes LiveKit Agents' RoomIO ignore the avatar as a "user" and
what lets front ends (components-js ``useVoiceAssistant``) show the avatar's camera and microphone tracks as
the agent's own.
"""

from __future__ import annotations

from datetime import timedelta

from livekit import api

ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
DEFAULT_AVATAR_IDENTITY = "talkingmachines-avatar"
DEFAULT_TOKEN_TTL = timedelta(hours=6)


def _require(value: str, what: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{what} is empty; a LiveKit token needs a non-empty {what}")
    return value


def mint_avatar_token(
    *,
    api_key: str,
    api_secret: str,
    room: str,
    agent_identity: str,
    identity: str = DEFAULT_AVATAR_IDENTITY,
    name: str | None = None,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
) -> str:
    """Return a JWT that lets the avatar join ``room`` and publish for ``agent_identity``.

    Grants: join ``room``, publish (camera and microphone only), subscribe, publish data (byte streams, RPC).
    """
    _require(api_key, "LiveKit API key")
    _require(api_secret, "LiveKit API secret")
    _require(room, "room name")
    _require(identity, "avatar identity")
    _require(agent_identity, "agent identity (lk.publish_on_behalf)")
    if identity == agent_identity:
        raise ValueError(
            f"avatar identity {identity!r} equals the agent identity; the avatar must join as its own "
            "participant that publishes on behalf of the agent — pick a different avatar identity"
        )
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_publish_sources=["camera", "microphone"],
    )
    return (
        api.AccessToken(api_key, api_secret)
        .with_kind("agent")
        .with_identity(identity)
        .with_name(name or identity)
        .with_grants(grants)
        .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
        .with_ttl(ttl)
        .to_jwt()
    )

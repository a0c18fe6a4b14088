"""LiveKit output: the avatar participant's token, A/V publisher and the avatar-worker protocol.

``agent_plugin`` (the agent-side ``AvatarSession``) needs ``livekit-agents`` and is not imported here, so the
server runs with the ``livekit`` RTC SDK alone.
"""

"""The deploy tests reuse the real ``livekit-server`` fixture of tests/livekit/conftest.py."""

from tests.livekit.conftest import livekit_server

__all__ = ["livekit_server"]

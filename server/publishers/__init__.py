"""Publishers: where finished video frames and their audio go (an MP4 file, or a LiveKit room)."""

from server.publishers.file import Mp4FilePublisher, PublishedFile

__all__ = ["Mp4FilePublisher", "PublishedFile"]

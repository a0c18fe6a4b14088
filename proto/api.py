"""HTTP API schemas of the control plane (pydantic v2): sessions, audio ingest, speakers, readiness, errors.

Transport decisions (documented here because they are part of the contract):

- The reference image travels **base64 inside the JSON body** of ``POST /v1/sessions`` (a bare base64 string
  or a ``data:image/png;base64,...`` URL as browsers' ``FileReader.readAsDataURL`` produces). One JSON body
  keeps the request self-describing, lets the LiveKit agent plugin send it with a plain JSON client, and needs
  no multipart parser on the server. PNG and JPEG are accepted.
- Face boxes are pixels of the reference image as uploaded (after EXIF orientation), ``(x0, y0, x1, y1)``
  with ``x0 < x1``, ``y0 < y1``, the right/bottom edges exclusive.
- Audio is never part of these JSON schemas: ``POST /v1/sessions/{id}/audio`` takes a WAV/FLAC/OGG body or
  raw ``audio/pcm`` int16, and ``WS /v1/sessions/{id}/audio`` takes int16 PCM frames (see ``server.api``).
"""

from __future__ import annotations

import base64
import binascii
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_EMBEDDING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)

PROMPT_MAX_CHARS = 2000  # a prompt's text, as a plain string or Prompt.text

PixelBox = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in pixels, right/bottom exclusive."""


class _Strict(BaseModel):
    # Unknown fields are errors: a misspelt option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_box(box: PixelBox) -> PixelBox:
    x0, y0, x1, y1 = box
    if min(box) < 0:
        raise ValueError(f"face box {list(box)} has a negative coordinate; boxes are pixels (x0, y0, x1, y1)")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"face box {list(box)} is empty or inverted; it must satisfy x0 < x1 and y0 < y1")
    return box


class Character(_Strict):
    """One character of the picture: where its face is, so audio acts there."""

    box: PixelBox = Field(description="face box (x0, y0, x1, y1) in pixels of the reference image")
    name: str | None = Field(default=None, max_length=64, description="a label for logs and the session info")

    _validate_box = field_validator("box")(_check_box)


class Face(_Strict):
    """A face region the session uses, as given by the caller, detected, or the central fallback."""

    box: PixelBox = Field(description="(x0, y0, x1, y1) in pixels")
    box_norm: tuple[float, float, float, float] = Field(
        description="the same box divided by (width, height, width, height), each in [0, 1]"
    )
    source: Literal["given", "detected", "fallback"]
    name: str | None = None


class Prompt(_Strict):
    """The text conditioning: text to encode, or names of embeddings precomputed on the server.

    Embedding references are names (not paths) that the server resolves in its own embedding store, so a
    client can neither read arbitrary files nor needs to ship large tensors.
    """

    text: str | None = Field(default=None, max_length=PROMPT_MAX_CHARS)
    text_embedding: str | None = Field(default=None, description="name of a precomputed text embedding")
    image_embedding: str | None = Field(
        default=None, description="name of a precomputed CLIP image embedding of the reference image"
    )

    @field_validator("text_embedding", "image_embedding")
    @classmethod
    def _embedding_name(cls, value: str | None) -> str | None:
        if value is not None and not _EMBEDDING_NAME.match(value):
            raise ValueError(
                f"embedding reference {value!r} is not a valid name: use letters, digits, '.', '_', '-' "
                "(no path separators), at most 128 characters"
            )
        return value

    @model_validator(mode="after")
    def _text_xor_embedding(self) -> Prompt:
        if self.text is not None and self.text_embedding is not None:
            raise ValueError("give either prompt.text or prompt.text_embedding, not both")
        return self


class LiveKitOutput(_Strict):
    """Publish into a LiveKit room as an avatar participant that publishes on behalf of the agent."""

    type: Literal["livekit"]
    url: str = Field(description="LiveKit server URL (ws://, wss://, http:// or https://)")
    room: str = Field(min_length=1, max_length=256)
    identity: str = Field(min_length=1, max_length=256, description="the avatar participant's identity")
    agent_identity: str = Field(
        min_length=1, max_length=256, description="the voice agent this avatar publishes on behalf of"
    )
    name: str | None = Field(default=None, max_length=256, description="display name of the avatar")
    token: SecretStr | None = Field(
        default=None,
        description="a join token minted for `identity` (kind agent, lk.publish_on_behalf = agent_identity); "
        "when absent the server mints one with its own LiveKit API key and secret",
    )

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError(f"LiveKit url {value!r} must start with ws://, wss://, http:// or https://")
        return value

    @field_validator("room", "identity", "agent_identity")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank (only spaces)")
        return value

    @model_validator(mode="after")
    def _distinct_identities(self) -> LiveKitOutput:
        if self.identity == self.agent_identity:
            raise ValueError(
                f"output.identity {self.identity!r} equals output.agent_identity; the avatar joins as its "
                "own "
                "participant — pick a different avatar identity"
            )
        return self


class FileOutput(_Strict):
    """Write an MP4 with audio, relative to the server's configured output directory."""

    type: Literal["file"]
    path: str = Field(
        min_length=1, max_length=1024, description="relative path under the server's file_output_dir"
    )

    @field_validator("path")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"output.path {value!r} contains a control character (NUL, newline, ...)")
        return value


Output = Annotated[LiveKitOutput | FileOutput, Field(discriminator="type")]


class SessionCreate(_Strict):
    """Body of ``POST /v1/sessions``."""

    image: str = Field(
        description="reference image, PNG or JPEG: base64 (standard alphabet) or a data:image/...;base64,"
        " URL",
        repr=False,
    )
    prompt: Annotated[str, Field(max_length=PROMPT_MAX_CHARS)] | Prompt | None = Field(
        default=None, description="text, or a Prompt with embedding names"
    )
    characters: list[Character] | None = Field(
        default=None,
        max_length=16,
        description="face boxes; when absent, faces are detected (falling back to one central box)",
    )
    speaking: list[int] = Field(
        default=[0],
        max_length=16,
        description="indices of the characters the session's audio drives at start; the others stay silent",
    )
    output: Output

    @field_validator("image")
    @classmethod
    def _base64_image(cls, value: str) -> str:
        decode_image(value)
        return value

    @field_validator("speaking")
    @classmethod
    def _speaking_indices(cls, value: list[int]) -> list[int]:
        return check_speaking(value)

    def image_bytes(self) -> bytes:
        """The decoded image bytes (PNG/JPEG)."""
        return decode_image(self.image)

    def prompt_spec(self) -> Prompt | None:
        """The prompt as a ``Prompt`` (a bare string is its ``text``)."""
        return Prompt(text=self.prompt) if isinstance(self.prompt, str) else self.prompt


def decode_image(value: str) -> bytes:
    """Base64 (optionally a data URL) → bytes; ValueError naming the problem."""
    payload = _DATA_URL.sub("", value, count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            f"image is not valid base64 ({exc}); send the PNG/JPEG bytes base64-encoded, standard alphabet"
        ) from exc
    if not data:
        raise ValueError("image is empty; send a base64-encoded PNG or JPEG")
    return data


def check_speaking(value: list[int]) -> list[int]:
    if any(i < 0 for i in value):
        raise ValueError(f"speaking indices {value} must be non-negative character indices")
    if len(set(value)) != len(value):
        raise ValueError(f"speaking indices {value} contain duplicates")
    return sorted(value)


class SessionState(StrEnum):
    starting = "starting"
    running = "running"
    ended = "ended"
    failed = "failed"


LIVE_STATES = frozenset({SessionState.starting, SessionState.running})


class TTBCStats(_Strict):
    """Time between consecutive published chunks so far, seconds (None until a second chunk is published)."""

    count: int = 0
    mean_s: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None
    max_s: float | None = None
    deadline_s: float | None = Field(
        default=None, description="the chunk's video duration, the real-time bar"
    )
    deadline_misses: int = 0


class AudioAccounting(_Strict):
    """What became of a session's accepted audio, seconds at 16 kHz: ``accepted_s = played_s + dropped_s +
    pending_s`` at every moment. *Pending* is accepted and not yet played (queued, being generated, or in the
    playout buffer); it is capped at ``max_pending_s`` (pushes past it get 429). Audio is *dropped* by a
    barge-in (``clear``) or when the session ends before it played; once ended, nothing is pending."""

    accepted_s: float = 0.0
    played_s: float = 0.0
    dropped_s: float = 0.0
    pending_s: float = 0.0
    max_pending_s: float | None = Field(default=None, description="the cap on pending audio; None: no cap")


class SessionInfo(_Strict):
    """State of one session, as ``POST /v1/sessions`` and ``GET /v1/sessions/{id}`` return it."""

    id: str
    state: SessionState
    reason: str | None = Field(default=None, description="why the session ended or failed")
    chunks_generated: int = 0
    playout_buffer_s: float = Field(default=0.0, description="generated video not yet played out, seconds")
    first_frame_latency_s: float | None = None
    ttbc: TTBCStats = TTBCStats()
    livekit_identity: str | None = Field(default=None, description="the identity the session joined as")
    faces: list[Face] = []
    speaking: list[int] = []
    degraded: bool = Field(
        default=False, description="its latest chunk ran at reduced quality (--degrade; late playout)"
    )
    degraded_chunks: int = Field(default=0, description="chunks generated at reduced quality so far")
    audio: AudioAccounting = Field(
        default=AudioAccounting(), description="accepted audio played, dropped and pending (the final count "
        "once the session ended: the DELETE answer says how much was dropped)"
    )


class SessionList(_Strict):
    sessions: list[SessionInfo]


class SpeakersUpdate(_Strict):
    """Body of ``POST /v1/sessions/{id}/speakers``: the characters that speak from now on; all others are
    silent (silence embedding). An empty list makes everyone listen."""

    speaking: list[int] = Field(max_length=16)

    @field_validator("speaking")
    @classmethod
    def _speaking_indices(cls, value: list[int]) -> list[int]:
        return check_speaking(value)


class AudioAccepted(_Strict):
    """Answer of ``POST /v1/sessions/{id}/audio``: what was pushed to the session (all of the request)."""

    samples: int = Field(description="samples pushed, at 16 kHz")
    seconds: float
    pending_s: float | None = Field(
        default=None, description="the session's audio accepted and not yet played, after this push"
    )
    max_pending_s: float | None = Field(default=None, description="the session's cap on pending audio")


class Readiness(_Strict):
    ready: bool
    reason: str


class ErrorResponse(_Strict):
    """Body of every 4xx/5xx answer."""

    code: str = Field(description="machine-readable error kind, e.g. unknown_session, no_capacity")
    detail: str = Field(description="what went wrong and how to fix it")
    retry_after_s: float | None = None
    pending_s: float | None = Field(
        default=None, description="429 audio_backlog_full: the session's pending audio (not yet played)"
    )
    max_pending_s: float | None = Field(
        default=None, description="429/413: the session's cap on pending audio"
    )

"""Settings of the HTTP control plane, from a TOML or JSON file and ``TALKINGMACHINES_*`` environment
variables.

``talkingmachines serve --config FILE`` reads the file's ``[api]`` table (or the whole document when it has no
``api`` key, i.e. an API-only file). Environment variables override the file, one per field, named
``TALKINGMACHINES_`` + the field in upper case (``TALKINGMACHINES_API_KEY``,
``TALKINGMACHINES_MAX_SESSIONS``);
list fields take JSON (``["https://a.example"]``) or comma-separated values. Example ``serve.toml``::

    [api]
    api_key = "change-me"            # or TALKINGMACHINES_API_KEY
    max_sessions = 2
    cors_origins = ["https://app.example.com"]
    file_output_dir = "/var/lib/talkingmachines/out"
    drain_timeout_s = 300            # SIGTERM: live calls go on this long, new ones get 503

The browser call page (``GET /call``, ``server.call_page``) gets its LiveKit token from
``POST /v1/call/token``, which takes ``call_access_key`` (a key to hand to callers), the API key, or the
short-lived signed ticket of a call link (``POST /v1/call/link``, at most ``call_link_ttl_s``); set
``livekit_public_url`` to the LiveKit URL browsers use. Keys never go in URLs.

Exposure of the open routes: ``/metrics`` has no per-session labels unless ``metrics_session_labels = true``,
and needs the key when ``metrics_require_key = true``; an audio WebSocket must authenticate within
``ws_auth_timeout_s``. Request bodies are capped per route while they stream (``max_session_body_bytes``,
``max_audio_bytes``, 64 KiB elsewhere), after the key was checked.

Authentication is required: a server with no ``api_key`` refuses to start unless ``auth_disabled = true`` is
set explicitly (local use only).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "TALKINGMACHINES_"
_LIST_FIELDS = ("allowed_audio_rates", "cors_origins")


class SettingsError(ValueError):
    """The API settings are missing, malformed or contradictory; the message names the field."""


class ApiSettings(BaseModel):
    """Control-plane settings. Sizes in bytes, durations in seconds, rates in Hz."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(default=None, description="bearer key every /v1 request must present")
    auth_disabled: bool = Field(default=False, description="accept requests without a key (local use only)")
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    max_image_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="decoded reference image size")
    allowed_audio_rates: tuple[int, ...] = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
    max_audio_seconds: float = Field(
        default=60.0, gt=0, description="longest audio per HTTP request or WS frame"
    )
    max_audio_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="largest audio request body")
    max_sessions: int = Field(default=4, ge=1, description="live sessions this serving group accepts")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent when the session limit is hit")
    cors_origins: tuple[str, ...] = Field(default=(), description="browser origins allowed; none by default")
    file_output_dir: Path | None = Field(
        default=None, description="directory for `file` outputs; file outputs are refused when unset"
    )
    livekit_api_key: SecretStr | None = Field(
        default=None, description="to mint avatar tokens for requests that bring none"
    )
    livekit_api_secret: SecretStr | None = None
    call_access_key: SecretStr | None = Field(
        default=None,
        description="key the call page's users present for POST /v1/call/token (the api_key works too)",
    )
    livekit_public_url: str | None = Field(
        default=None, description="LiveKit URL as browsers reach it, handed to the call page with its token"
    )
    call_link_ttl_s: float = Field(
        default=900.0,
        gt=0,
        le=7 * 24 * 3600,
        description="longest life of a call link's signed ticket (POST /v1/call/link), and its default",
    )
    ws_auth_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="an audio WebSocket without the key in its headers must send its first message "
        "(with api_key) within this many seconds, or it is closed (4401)",
    )
    metrics_session_labels: bool = Field(
        default=False,
        description="export per-session series (tm_playout_buffer_seconds{session}); session ids are then "
        "visible to whoever can read /metrics",
    )
    metrics_require_key: bool = Field(
        default=False, description="GET /metrics needs the API key like the /v1 routes"
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, how long live calls may go on (new sessions refused) before the server "
        "ends them and exits; 0 ends them at once",
    )

    @field_validator("allowed_audio_rates")
    @classmethod
    def _rates(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(r <= 0 for r in value):
            raise ValueError(f"allowed_audio_rates must be positive sample rates in Hz, got {list(value)}")
        return tuple(sorted(set(value)))

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must be a scheme://host[:port] origin or '*'")
        return value

    @model_validator(mode="after")
    def _auth(self) -> ApiSettings:
        key = self.api_key.get_secret_value() if self.api_key else ""
        if self.auth_disabled and key:
            raise ValueError("api_key is set but auth_disabled is true; remove one of them")
        if not self.auth_disabled and not key.strip():
            raise ValueError(
                f"api_key is required: set it in the config file or {ENV_PREFIX}API_KEY, or set "
                "auth_disabled = true explicitly for local use"
            )
        if self.livekit_public_url is not None and not self.livekit_public_url.startswith(
            ("ws://", "wss://", "http://", "https://")
        ):
            raise ValueError(f"livekit_public_url {self.livekit_public_url!r} must start with wss:// or ws://")
        if (self.livekit_api_key is None) != (self.livekit_api_secret is None):
            raise ValueError("livekit_api_key and livekit_api_secret must be given together")
        return self

    @property
    def max_session_body_bytes(self) -> int:
        """Largest ``POST /v1/sessions`` body: the base64 image (4/3 of its bytes) plus room for the rest."""
        return self.max_image_bytes * 4 // 3 + 64 * 1024

    @property
    def max_ws_message_bytes(self) -> int:
        """Largest WebSocket message uvicorn buffers: one audio frame of ``max_audio_seconds`` at the highest
        allowed rate (int16), plus room for the JSON messages."""
        return int(self.max_audio_seconds * max(self.allowed_audio_rates)) * 2 + 64 * 1024

    @classmethod
    def load(cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ApiSettings:
        """Settings from ``path`` (``.toml`` or ``.json``; optional) overridden by ``TALKINGMACHINES_*`` vars.

        Raises:
            SettingsError: unreadable file, unknown or invalid fields, or no api_key without auth_disabled.
        """
        values: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
        env = os.environ if environ is None else environ
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _parse_env(name, raw)
        where = f"settings from {path}" if path is not None else "settings"
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(f"invalid {where} — {problems}") from exc


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".toml":
            document = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            document = json.loads(path.read_text())
        else:
            raise SettingsError(f"config file {str(path)!r} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(
            f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}"
        ) from exc
    if not isinstance(document, dict):
        raise SettingsError(f"config file {str(path)!r} must hold a table/object of settings")
    section = document.get("api", document)
    if not isinstance(section, dict):
        raise SettingsError(f"config file {str(path)!r}: 'api' must be a table/object of settings")
    return dict(section)


def _parse_env(name: str, raw: str) -> Any:
    if name not in _LIST_FIELDS:
        return raw
    text = raw.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{ENV_PREFIX}{name.upper()} is not a valid JSON list: {exc}") from exc
    return [item.strip() for item in text.split(",") if item.strip()]

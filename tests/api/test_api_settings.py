"""ApiSettings: config files, environment overrides, and refusal of unsafe or malformed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.settings import ApiSettings, SettingsError


def test_a_toml_api_table_is_read_and_env_vars_override_it(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[api]\napi_key = "from-file"\nmax_sessions = 2\n\n[runtime]\npreset = "tiny"\n')
    settings = ApiSettings.load(config, environ={"TALKINGMACHINES_MAX_SESSIONS": "3"})
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-file"
    assert settings.max_sessions == 3


def test_an_api_only_json_file_is_read(tmp_path: Path) -> None:
    config = tmp_path / "api.json"
    config.write_text(json.dumps({"auth_disabled": True, "allowed_audio_rates": [48000, 16000]}))
    settings = ApiSettings.load(config, environ={})
    assert settings.auth_disabled and settings.allowed_audio_rates == (16000, 48000)


def test_list_settings_come_from_comma_separated_env_vars() -> None:
    env = {
        "TALKINGMACHINES_API_KEY": "k",
        "TALKINGMACHINES_CORS_ORIGINS": "https://a.example, https://b.example",
    }
    assert ApiSettings.load(environ=env).cors_origins == ("https://a.example", "https://b.example")


def test_defaults_close_cors_and_keep_limits() -> None:
    settings = ApiSettings.load(environ={"TALKINGMACHINES_API_KEY": "k"})
    assert settings.cors_origins == ()
    assert settings.file_output_dir is None
    assert 16000 in settings.allowed_audio_rates


def test_no_api_key_without_auth_disabled_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"api_key is required.*auth_disabled"):
        ApiSettings.load(environ={})


def test_a_key_together_with_auth_disabled_is_refused() -> None:
    with pytest.raises(SettingsError, match="remove one of them"):
        ApiSettings.load(environ={"TALKINGMACHINES_API_KEY": "k", "TALKINGMACHINES_AUTH_DISABLED": "true"})


def test_an_unknown_setting_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[api]\napi_key = "k"\nmax_sesions = 2\n')
    with pytest.raises(SettingsError, match="max_sesions"):
        ApiSettings.load(config, environ={})


def test_a_missing_or_unsupported_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        ApiSettings.load(tmp_path / "nope.toml", environ={})
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("api_key: k\n")
    with pytest.raises(SettingsError, match=r"\.toml or \.json"):
        ApiSettings.load(yaml, environ={})

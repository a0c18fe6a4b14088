"""Audio ingest over HTTP (WAV / raw PCM) and WebSocket: what reaches the backend, and the error paths."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from frontends.audio_io import resample
from server.api import create_app
from server.pcm_stream import StreamResampler, decode_pcm16
from tests.api.api_fakes import API_KEY, AUTH, FakeBackend, make_settings, session_body


def tone_int16(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def pcm_headers(rate: int, channels: int = 1) -> dict[str, str]:
    return {**AUTH, "Content-Type": f"audio/pcm; rate={rate}; channels={channels}"}


def test_pcm16_at_16k_reaches_the_backend_sample_exact(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone_int16(0.5, 16000)
    response = client.post(
        f"/v1/sessions/{session_id}/audio", content=pcm.tobytes(), headers=pcm_headers(16000)
    )
    assert response.status_code == 200
    assert response.json() == {"samples": 8000, "seconds": 0.5, "pending_s": 0.5, "max_pending_s": 30.0}
    np.testing.assert_array_equal(backend.pushed(session_id), pcm.astype(np.float32) / 32768)


def test_stereo_pcm_at_48k_is_downmixed_and_resampled(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone_int16(0.25, 48000, channels=2)
    response = client.post(
        f"/v1/sessions/{session_id}/audio", content=pcm.tobytes(), headers=pcm_headers(48000, 2)
    )
    assert response.status_code == 200
    expected = resample(pcm[:, 0].astype(np.float32) / 32768, 48000, 16000)
    np.testing.assert_allclose(backend.pushed(session_id), expected, atol=1e-6)
    assert response.json()["samples"] == 4000


def test_a_wav_body_is_decoded_and_resampled_to_16k(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone_int16(0.3, 24000)
    response = client.post(
        f"/v1/sessions/{session_id}/audio",
        content=wav_bytes(pcm, 24000),
        headers={**AUTH, "Content-Type": "audio/wav"},
    )
    assert response.status_code == 200
    expected = resample(pcm.astype(np.float32) / 32768, 24000, 16000)
    np.testing.assert_allclose(backend.pushed(session_id), expected, atol=1e-6)


def test_pcm_without_a_rate_is_422(client: TestClient, backend: FakeBackend, session_id: str) -> None:
    response = client.post(
        f"/v1/sessions/{session_id}/audio",
        content=b"\0\0" * 100,
        headers={**AUTH, "Content-Type": "audio/pcm"},
    )
    assert response.status_code == 422
    assert "rate=16000" in response.json()["detail"]
    assert backend.pushes == []


def test_an_unsupported_pcm_rate_is_422(client: TestClient, backend: FakeBackend, session_id: str) -> None:
    response = client.post(
        f"/v1/sessions/{session_id}/audio", content=b"\0\0" * 100, headers=pcm_headers(11025)
    )
    assert response.status_code == 422
    assert response.json()["code"] == "unsupported_sample_rate"
    assert "11025" in response.json()["detail"]
    assert backend.pushes == []


def test_an_unsupported_wav_rate_is_422(client: TestClient, session_id: str) -> None:
    body = wav_bytes(tone_int16(0.1, 11025), 11025)
    response = client.post(
        f"/v1/sessions/{session_id}/audio", content=body, headers={**AUTH, "Content-Type": "audio/wav"}
    )
    assert response.status_code == 422
    assert response.json()["code"] == "unsupported_sample_rate"


def test_pcm_with_half_a_sample_is_422(client: TestClient, backend: FakeBackend, session_id: str) -> None:
    response = client.post(
        f"/v1/sessions/{session_id}/audio", content=b"\0" * 101, headers=pcm_headers(16000)
    )
    assert response.status_code == 422
    assert "101 bytes" in response.json()["detail"]
    assert backend.pushes == []


def test_undecodable_audio_is_422_with_the_reason(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    response = client.post(
        f"/v1/sessions/{session_id}/audio",
        content=b"RIFF not really a wav",
        headers={**AUTH, "Content-Type": "audio/wav"},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_audio"
    assert "could not be decoded" in response.json()["detail"]
    assert backend.pushes == []


def test_an_empty_body_is_422(client: TestClient, session_id: str) -> None:
    response = client.post(f"/v1/sessions/{session_id}/audio", content=b"", headers=pcm_headers(16000))
    assert response.status_code == 422


def test_audio_longer_than_the_limit_is_413(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_audio_seconds=1.0))) as client:
        session_id = client.post("/v1/sessions", json=session_body(), headers=AUTH).json()["id"]
        pcm = tone_int16(1.5, 16000)
        raw = client.post(
            f"/v1/sessions/{session_id}/audio", content=pcm.tobytes(), headers=pcm_headers(16000)
        )
        wav = client.post(
            f"/v1/sessions/{session_id}/audio",
            content=wav_bytes(pcm, 16000),
            headers={**AUTH, "Content-Type": "audio/wav"},
        )
    assert (raw.status_code, wav.status_code) == (413, 413)
    assert "1.50 s" in raw.json()["detail"]
    assert backend.pushes == []


def test_an_audio_body_over_the_byte_limit_is_413(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_audio_bytes=1000))) as client:
        session_id = client.post("/v1/sessions", json=session_body(), headers=AUTH).json()["id"]
        response = client.post(
            f"/v1/sessions/{session_id}/audio", content=b"\0" * 1002, headers=pcm_headers(16000)
        )
    assert response.status_code == 413
    assert backend.pushes == []


def test_audio_for_an_unknown_session_is_404(client: TestClient) -> None:
    response = client.post("/v1/sessions/nope/audio", content=b"\0\0", headers=pcm_headers(16000))
    assert response.status_code == 404


def test_audio_for_a_failed_session_is_409_with_its_reason(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    backend.fail(session_id, "worker rank 1 stopped answering")
    response = client.post(f"/v1/sessions/{session_id}/audio", content=b"\0\0", headers=pcm_headers(16000))
    assert response.status_code == 409
    assert "worker rank 1 stopped answering" in response.json()["detail"]


def test_the_stream_resampler_equals_resampling_the_whole_stream() -> None:
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(44100 + 77)).astype(np.float32)
    stream = StreamResampler(44100)
    pieces, start = [], 0
    for size in rng.integers(1, 2000, 200):
        pieces.append(stream.push(x[start : start + size]))
        start += size
        if start >= x.size:
            break
    pieces.append(stream.flush())
    np.testing.assert_allclose(np.concatenate(pieces), resample(x, 44100, 16000), atol=1e-6)


def test_decode_pcm16_maps_full_scale_to_unit_range() -> None:
    data = np.array([-32768, 0, 16384], dtype="<i2").tobytes()
    np.testing.assert_array_equal(decode_pcm16(data), np.array([-1.0, 0.0, 0.5], dtype=np.float32))


# WebSocket


def disconnect_and_wait(ws: object, backend: FakeBackend, session_id: str, samples: int) -> None:
    """Disconnect like a client that drops mid-stream, then give the server time to drain what it received
    (TestClient cancels the app when the ``with`` block ends; a real server does not)."""
    ws.close(1000)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while backend.pushed(session_id).size < samples and time.monotonic() < deadline:
        time.sleep(0.01)


def test_websocket_audio_sent_before_a_disconnect_is_all_pushed(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone_int16(0.1, 48000)
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate=48000", headers=AUTH) as ws:
        assert ws.receive_json() == {"type": "ready", "sample_rate": 48000}
        for start in range(0, pcm.size, 960):
            ws.send_bytes(pcm[start : start + 960].tobytes())
        # The client leaves without a flush: the resampler's held-back tail must still be pushed.
        disconnect_and_wait(ws, backend, session_id, 1600)
    expected = resample(pcm.astype(np.float32) / 32768, 48000, 16000)
    np.testing.assert_allclose(backend.pushed(session_id), expected, atol=1e-6)
    assert backend.sessions[session_id].state == "running"
    assert backend.clears == [] and backend.closed == []


def test_websocket_audio_at_48k_is_resampled_continuously_across_frames(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    pcm = tone_int16(0.2, 48000)
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate=48000", headers=AUTH) as ws:
        ws.receive_json()
        for start in range(0, pcm.size, 960):  # 20 ms frames
            ws.send_bytes(pcm[start : start + 960].tobytes())
        ws.send_json({"type": "flush"})
        assert ws.receive_json() == {"type": "flushed", "samples": 3200}
    expected = resample(pcm.astype(np.float32) / 32768, 48000, 16000)
    np.testing.assert_allclose(backend.pushed(session_id), expected, atol=1e-6)


def test_websocket_accepts_the_key_and_rate_in_the_first_message(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio") as ws:
        ws.send_json({"sample_rate": 16000, "api_key": API_KEY})
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(b"\0\0" * 160)
        ws.send_json({"type": "flush"})
        assert ws.receive_json() == {"type": "flushed", "samples": 160}
    assert backend.pushed(session_id).size == 160


def expect_close(ws: object, code: int) -> dict:
    error = ws.receive_json()  # type: ignore[attr-defined]
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()  # type: ignore[attr-defined]
    assert closed.value.code == code
    return error


def test_websocket_without_a_key_is_closed_4401(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate=16000") as ws:
        ws.send_json({"sample_rate": 16000})
        assert expect_close(ws, 4401)["code"] == "unauthorized"
    assert backend.pushes == []


def test_websocket_with_a_wrong_key_is_closed_4401(client: TestClient, session_id: str) -> None:
    headers = {"Authorization": "Bearer wrong"}
    with client.websocket_connect(
        f"/v1/sessions/{session_id}/audio?sample_rate=16000", headers=headers
    ) as ws:
        expect_close(ws, 4401)


def test_websocket_with_an_unsupported_rate_is_closed_4422(client: TestClient, session_id: str) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate=11025", headers=AUTH) as ws:
        error = expect_close(ws, 4422)
    assert error["code"] == "unsupported_sample_rate"


def test_websocket_for_an_unknown_session_is_closed_4404(client: TestClient) -> None:
    with client.websocket_connect("/v1/sessions/nope/audio?sample_rate=16000", headers=AUTH) as ws:
        assert expect_close(ws, 4404)["code"] == "unknown_session"


def test_websocket_frame_with_half_a_sample_is_closed_4422_keeping_earlier_audio(
    client: TestClient, backend: FakeBackend, session_id: str
) -> None:
    with client.websocket_connect(f"/v1/sessions/{session_id}/audio?sample_rate=16000", headers=AUTH) as ws:
        ws.receive_json()
        ws.send_bytes(b"\1\0" * 10)
        ws.send_bytes(b"\0" * 3)
        assert expect_close(ws, 4422)["code"] == "invalid_audio"
    assert backend.pushed(session_id).size == 10


def test_websocket_frame_over_the_limit_is_closed_4413(backend: FakeBackend) -> None:
    with TestClient(create_app(backend, make_settings(max_audio_seconds=0.01))) as client:
        session_id = client.post("/v1/sessions", json=session_body(), headers=AUTH).json()["id"]
        with client.websocket_connect(
            f"/v1/sessions/{session_id}/audio?sample_rate=16000", headers=AUTH
        ) as ws:
            ws.receive_json()
            ws.send_bytes(b"\0\0" * 161)
            expect_close(ws, 4413)
    assert backend.pushes == []

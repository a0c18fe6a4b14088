"""A minimal blocking WebSocket client on a plain socket, with wsproto (a runtime dependency): the tests of
the real server need no WebSocket package of the test extras."""

from __future__ import annotations

import json
import socket
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, Request, TextMessage


class WsClient:
    """Connects (the handshake) on construction; ``recv`` returns ``("text", str)``, ``("bytes", bytes)`` or
    ``("close", code, reason)``."""

    def __init__(
        self, host: str, port: int, target: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []
        self._send(Request(host=f"{host}:{port}", target=target, extra_headers=headers or []))
        event = self._next(10)
        if not isinstance(event, AcceptConnection):
            raise ConnectionError(f"the server refused the WebSocket handshake: {event}")

    def _send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def _next(self, timeout: float) -> Event:
        self.sock.settimeout(timeout)
        while not self._events:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
            if not data and not self._events:
                raise ConnectionError("the server closed the connection")
        return self._events.pop(0)

    def recv(self, timeout: float = 10) -> tuple[Any, ...]:
        event = self._next(timeout)
        if isinstance(event, CloseConnection):
            try:
                self._send(event.response())
            except OSError:
                pass
            return ("close", event.code, event.reason)
        if isinstance(event, TextMessage):
            return ("text", event.data)
        if isinstance(event, BytesMessage):
            return ("bytes", bytes(event.data))
        return ("event", event)

    def recv_json(self, timeout: float = 10) -> dict[str, Any]:
        kind, *rest = self.recv(timeout)
        assert kind == "text", (kind, rest)
        return json.loads(rest[0])

    def send_text(self, text: str) -> None:
        self._send(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def close(self) -> None:
        try:
            self._send(CloseConnection(code=1000))
        except Exception:  # already closed by the server
            pass
        self.sock.close()

"""A fake doveadm HTTP API on loopback (twisted.web, on the test's reactor): it records every
request and answers as Dovecot 2.3.19.1 did (tests/doveadm/test_protocol.py quotes those answers),
in the mode the test sets."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

KEY = b"s3cret-api-key"


@dataclass
class Seen:
    """One request as the server saw it."""

    method: bytes
    path: bytes
    authorization: str | None
    content_type: str | None
    commands: Any


class FakeDoveadm(Resource):
    """POST /doveadm/v1. `mode`: "kick" (each `who` lists `sessions` connections, each kick
    succeeds), "none" (kick answers exit code 68), "usage" (exit code 64), "silent" (never
    answers), or an HTTP status as an int. A wrong key is answered 401, as Dovecot does, and
    never answered at all when the request says `Connection: close`, as Dovecot 2.3.19.1 does."""

    isLeaf = True

    def __init__(self, mode: str | int = "kick", sessions: int = 1) -> None:
        super().__init__()
        self.mode = mode
        self.sessions = sessions
        self.seen: list[Seen] = []
        self.held: list[Request] = []
        self.port: IListeningPort | None = None

    def render_POST(self, request: Request) -> bytes | int:
        body = request.content.read()
        self.seen.append(Seen(request.method, request.path, _header(request, b"authorization"),
                              _header(request, b"content-type"), json.loads(body)))
        if _header(request, b"authorization") != "X-Dovecot-API " + base64.b64encode(KEY).decode():
            if (_header(request, b"connection") or "").lower() == "close":
                self.held.append(request)
                return NOT_DONE_YET
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b"X-Dovecot-API")
            return b""
        if self.mode == "silent":
            self.held.append(request)
            return NOT_DONE_YET
        if isinstance(self.mode, int):
            request.setResponseCode(self.mode)
            return b"oops"
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps([self._answer(command) for command in json.loads(body)]).encode()

    def _answer(self, command: list) -> list:
        name, parameters, tag = command
        user = parameters["mask"][0]
        if name == "who":
            count = self.sessions if self.mode == "kick" else 0
            return ["doveadmResponse", [{"username": user, "service": "imap", "pid": str(1000 + i),
                                         "ip": "127.0.0.1"} for i in range(count)], tag]
        if self.mode == "kick":
            return ["doveadmResponse", [{"result": user}], tag]
        return ["error", {"type": "exitCode", "exitCode": 68 if self.mode == "none" else 64}, tag]

    def start(self) -> str:
        """Listen on a free loopback port; the API's URL."""
        self.port = reactor.listenTCP(0, Site(self), interface="127.0.0.1")
        return f"http://127.0.0.1:{self.port.getHost().port}/doveadm/v1"

    async def stop(self) -> None:
        for request in self.held:
            if not request.finished and not request._disconnected:
                request.finish()
        if self.port is not None:
            await self.port.stopListening()


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode() if isinstance(value, bytes) else value

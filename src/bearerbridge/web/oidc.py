"""The faces of OpenID Connect: /jwks, the signing keys' public halves (RFC 7517 §5), and
/userinfo (Core §5.3)."""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from bearerbridge import keys
from bearerbridge.oauth import oidc
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.oauth.server import BridgeServer
from bearerbridge.storage.pool import StorePool
from bearerbridge.uses import LastUses
from bearerbridge.web.site import AsyncResource, Reply, json_reply, snapshot


class Jwks(AsyncResource):
    """GET /jwks: the next, current and unexpired retired keys (`keys.published`). The document is
    made in the pool (opening sealed RSA keys takes milliseconds) and kept `keys.REREAD` seconds,
    so that a rotation elsewhere is seen within that; relying parties may cache it as long."""

    isLeaf = True

    def __init__(self, pool: StorePool, clock: IReactorTime | None = None) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor  # here: importing this module installs no reactor

            clock = reactor
        self._pool = pool
        self._clock: IReactorTime = clock
        self._body: bytes | None = None
        self._read_at = -float("inf")

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def _get(self, request: Request) -> Reply | defer.Deferred[Reply]:
        if self._body is not None and self._clock.seconds() - self._read_at < keys.REREAD:
            return self._reply(self._body)
        return self._pool.run(self._read).addCallback(self._remember)

    def _read(self) -> dict[str, Any]:
        store = self._pool.store
        return keys.jwks(store.ensure_signing_keys(), store.sealer, int(time.time()))

    def _remember(self, document: dict[str, Any]) -> Reply:
        self._body, self._read_at = json.dumps(document, indent=2).encode(), self._clock.seconds()
        return self._reply(self._body)

    @staticmethod
    def _reply(body: bytes) -> Reply:
        return Reply(200, body, {b"Content-Type": b"application/jwk-set+json", b"Access-Control-Allow-Origin": b"*",
                                 b"Cache-Control": f"public, max-age={keys.REREAD}".encode()})


class UserInfo(AsyncResource):
    """GET or POST /userinfo with a bearer token granted `openid`: the claims its scope gives of
    its user (`oauth.oidc.userinfo`), or an RFC 6750 error with its WWW-Authenticate challenge.
    An answer with claims is a use of the token's grant at "userinfo", from the HTTP peer."""

    isLeaf = True

    def __init__(self, issuer: str, pool: StorePool, server: BridgeServer, uses: LastUses | None = None) -> None:
        super().__init__()
        self._issuer = issuer
        self._pool = pool
        self._server = server
        self._uses = uses

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._ask)

    render_POST = render_GET

    def _ask(self, request: Request) -> defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        return self._pool.run(oidc.userinfo, self._server, req).addCallback(self._answered, req)

    def _answered(self, answer: tuple[int, Any, list[tuple[str, str]]], req: HttpRequest) -> Reply:
        if req.token_use is not None and self._uses is not None:
            self._uses.note(*req.token_use, req.address)
        return json_reply(*answer)

"""The token endpoint and its siblings for programs: /token, /introspect, /revoke, /device_authorization.

Path 1, step 4: a POST is snapshot and handed to authlib in the pool
(`BridgeServer.create_token_response` or `create_endpoint_response`), which runs the grants
against the store; the answer is written back as JSON. Introspection first tries memory
(`oauth.endpoints.introspect_remembered`): resource servers ask about the same tokens over
and over, and a token read lately needs no trip to the pool.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.config import SaslSettings
from bearerbridge.guard import MemoryDoor
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.endpoints import introspect_remembered
from bearerbridge.oauth.grants import GRANT_TYPES
from bearerbridge.oauth.requests import HttpRequest
from bearerbridge.oauth.server import BridgeServer
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.recent import RecentReads
from bearerbridge.throttle import Key
from bearerbridge.uses import LastUses
from bearerbridge.web.site import AsyncResource, Reply, json_error, json_reply, retry_after, snapshot

AuthlibResponse = tuple[int, Any, Any]  # (status, body, headers), as BridgeServer.handle_response gives them


class ClientAuthThrottle:
    """Client authentication's throttle at every endpoint for programs (`[throttle.clients]`): per
    client id claimed and per address, failures (`invalid_client`) are answered late, and an
    address that keeps failing is refused unchecked for a while (429 with Retry-After)."""

    def __init__(self, door: MemoryDoor) -> None:
        self._door = door

    def check(self, req: HttpRequest) -> tuple[list[Key], Reply | None]:
        """The keys of this attempt, and the refusal to send if one of them is blocked."""
        keys = self._door.keys(req.claimed_client_id(), req.address)
        wait = self._door.blocked_for(keys)
        if not wait:
            return keys, None
        reply = json_error(429, "temporarily_unavailable", "Too many failed client authentications from this "
                           f"address; try again in {math.ceil(wait)} seconds")
        reply.headers.update(retry_after(wait))
        return keys, reply

    def passed(self, keys: list[Key]) -> None:
        """The client proved its secret: its failures are forgiven."""
        self._door.outcome(keys, ok=True)

    def settle(self, keys: list[Key], reply: Reply, client_failed: bool) -> Reply | defer.Deferred[Reply]:
        """`reply`, held for its delay if the client failed to authenticate; at once otherwise (no
        Deferred on the hot path of a good client)."""
        if not client_failed:
            self.passed(keys)
            return reply
        return self._door.hold(self._door.outcome(keys, ok=False), reply)


def _client_failed(status: int, body: Any) -> bool:
    return status == 401 or (isinstance(body, dict) and body.get("error") == "invalid_client")


class TokenEndpoint(AsyncResource):
    """/token (RFC 6749 §3.2), counted by grant type."""

    def __init__(self, issuer: str, pool: StorePool, server: BridgeServer, metrics: Metrics,
                 throttle: ClientAuthThrottle) -> None:
        super().__init__()
        self._issuer = issuer
        self._pool = pool
        self._server = server
        self._metrics = metrics
        self._throttle = throttle

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        grant_type = req.form.get("grant_type", "")
        label = grant_type if grant_type in GRANT_TYPES else "other"
        self._metrics.token_requests.labels(label).inc()
        keys, refusal = self._throttle.check(req)
        if refusal is not None:
            self._metrics.token_failures.labels(label, "throttled").inc()
            return refusal
        d = self._pool.run(self._server.create_token_response, req)
        return d.addCallback(self._count, label, keys)

    def _count(self, response: AuthlibResponse, grant_type: str, keys: list[Key]) -> Reply | defer.Deferred[Reply]:
        status, body, headers = response
        if status == 200:
            self._metrics.tokens_issued.labels(grant_type).inc()
        else:
            self._metrics.token_failures.labels(grant_type, body.get("error", "unknown")).inc()
        return self._throttle.settle(keys, json_reply(status, body, headers), _client_failed(status, body))


class EndpointResource(AsyncResource):
    """An authlib endpoint reached by POST: `revocation` (RFC 7009), `device_authorization`
    (RFC 8628 §3.1), `introspection` (RFC 7662)."""

    def __init__(self, issuer: str, pool: StorePool, server: BridgeServer, endpoint_name: str,
                 throttle: ClientAuthThrottle) -> None:
        super().__init__()
        self._issuer = issuer
        self._pool = pool
        self._server = server
        self._endpoint_name = endpoint_name
        self._throttle = throttle

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        return self._in_pool(snapshot(request, self._issuer))

    def _in_pool(self, req: HttpRequest) -> Reply | defer.Deferred[Reply]:
        keys, refusal = self._throttle.check(req)
        if refusal is not None:
            return refusal
        d = self._pool.run(self._server.create_endpoint_response, self._endpoint_name, req)
        return d.addCallback(lambda response: self._throttle.settle(keys, self._reply(response),
                                                                    _client_failed(response[0], response[1])))

    def _reply(self, response: AuthlibResponse) -> Reply:
        status, body, headers = response
        return json_reply(status, body, headers)


class IntrospectionResource(EndpointResource):
    """/introspect (RFC 7662): a client and token read lately are answered from memory. A resource
    server asking about an active access token uses its grant: noted in `uses`."""

    def __init__(self, issuer: str, pool: StorePool, server: BridgeServer, recent: RecentReads,
                 settings: SaslSettings, metrics: Metrics, throttle: ClientAuthThrottle,
                 uses: LastUses | None = None) -> None:
        super().__init__(issuer, pool, server, "introspection", throttle)
        self._recent = recent
        self._digest = pool.store.keyring.digest
        self._settings = settings
        self._metrics = metrics
        self._uses = uses

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        remembered = introspect_remembered(req, self._recent, self._digest, self._settings)
        if remembered is not None:
            return self._used(self._reply((200, remembered, [])), req)
        return self._in_pool(req)

    def _in_pool(self, req: HttpRequest) -> Reply | defer.Deferred[Reply]:
        answer = super()._in_pool(req)
        return answer if isinstance(answer, Reply) else answer.addCallback(self._used, req)

    def _used(self, reply: Reply, req: HttpRequest) -> Reply:
        """Note the use the answer made of a token (`oauth.endpoints.answered`). The HTTP peer is
        the resource server, not the user: the address is the one the resource server named
        (Dovecot's X-Dovecot-Auth-Remote), if any."""
        if req.token_use is not None and self._uses is not None:
            self._uses.note(*req.token_use, req.use_address)
        return reply

    def _reply(self, response: AuthlibResponse) -> Reply:
        status, body, _ = response
        result = "error" if status != 200 else ("active" if body.get("active") else "inactive")
        self._metrics.introspections.labels(result).inc()
        return super()._reply(response)

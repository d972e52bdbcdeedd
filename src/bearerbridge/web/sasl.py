"""`POST /sasl`: the SASL authority over HTTP, for servers written in other languages.

The caller is a registered confidential client (HTTP Basic or `client_id`/`client_secret` in
the form). It posts `mechanism`, `service` and `message` (the client's SASL message, base64;
empty when the client sent no initial response) and relays what it gets back:

- `{"result": "ok", "username": "..."}`: log the client in as that user;
- `{"result": "challenge", "challenge": "<base64>"}`: send the challenge, post the reply;
- `{"result": "failure", "challenge": "<base64>"|null, "reason": "...", "temporary": bool}`: send
  the challenge if there is one (RFC 7628 §3.2.2: the client then answers with a dummy
  message), then fail the exchange; `temporary` (then without a challenge: the token may be good)
  asks the client to try later.

Each call is one step of one exchange; no state is kept between calls.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from authlib.oauth2.rfc6749 import OAuth2Error
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure as TwistedFailure
from twisted.web.server import Request

from bearerbridge.config import SaslSettings
from bearerbridge.guard import MemoryDoor
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.grants import SECRET_AUTH
from bearerbridge.oauth.server import BridgeServer, discovery_url
from bearerbridge.sasl.mechanisms import Challenge, Check, Failure, ServerExchange, Step
from bearerbridge.sasl.verdict import Reason, Validate, Verdict
from bearerbridge.storage.models import Client
from bearerbridge.storage.pool import StorePool
from bearerbridge.throttle import Key
from bearerbridge.uses import LastUses
from bearerbridge.web.site import AsyncResource, BadRequest, Reply, json_reply, snapshot, when_ready
from bearerbridge.web.token import ClientAuthThrottle

log = Logger()


def _outcome(step: Step) -> dict[str, Any]:
    """The JSON answer for a step the exchange has reached."""
    if isinstance(step, Challenge) and not step.data:
        return {"result": "challenge", "challenge": ""}
    if isinstance(step, Challenge):  # an RFC 7628 error challenge, to relay before failing
        return {"result": "failure", "challenge": base64.b64encode(step.data).decode(), "temporary": False}
    if isinstance(step, Failure):
        return {"result": "failure", "challenge": None, "reason": step.reason, "temporary": False}
    raise TypeError(step)


class SaslEndpoint(AsyncResource):
    """Decides SASL logins posted over HTTP with the same validator as the Dovecot socket."""

    def __init__(self, issuer: str, pool: StorePool, server: BridgeServer, validate: Validate,
                 settings: SaslSettings, metrics: Metrics, throttle: ClientAuthThrottle, door: MemoryDoor,
                 uses: LastUses | None = None) -> None:
        super().__init__()
        self._throttle = throttle  # the caller's client authentication
        self._door = door  # failed logins, per caller and user named: answered late
        self._issuer = issuer
        self._pool = pool
        self._server = server
        self._validate = validate
        self._services = settings.services
        self._mechanisms = settings.offered  # `[sasl] mechanisms`, as the Dovecot socket offers them
        self._metrics = metrics
        self._uses = uses  # an accepted login's grant noted as used at its service (no address: none is posted)

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        req = snapshot(request, self._issuer)
        mechanism, service = req.form.get("mechanism", "").upper(), req.form.get("service", "")
        if mechanism not in self._mechanisms or not service:
            raise BadRequest(f"mechanism must be one of {', '.join(self._mechanisms)}, and service is required")
        try:
            message = base64.b64decode(req.form.get("message", ""), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("message must be base64") from None
        keys, refusal = self._throttle.check(req)
        if refusal is not None:
            return refusal
        client = self._pool.run(self._server.authenticate_client, req, SECRET_AUTH, "sasl")
        return client.addCallbacks(self._authenticated, self._refused_client, (keys, mechanism, service, message),
                                   errbackArgs=(keys,))

    def _authenticated(self, caller: Client, keys: list[Key], mechanism: str, service: str, message: bytes
                       ) -> Reply | defer.Deferred[Reply]:
        self._throttle.passed(keys)
        return self._exchange(caller.client_id, mechanism, service, message)

    def _refused_client(self, failure: TwistedFailure, keys: list[Key]) -> Reply | defer.Deferred[Reply]:
        failure.trap(OAuth2Error)
        error: OAuth2Error = failure.value  # trap() lets only an OAuth2Error by
        return self._throttle.settle(keys, json_reply(
            401, {"error": error.error, "error_description": error.get_error_description()},
            {"WWW-Authenticate": "Basic"}), client_failed=True)

    def _exchange(self, caller: str, mechanism: str, service: str, message: bytes) -> Reply | defer.Deferred[Reply]:
        exchange = ServerExchange(mechanism, discovery_url(self._issuer))
        step = exchange.receive(message or None)
        if not isinstance(step, Check):
            self._record(mechanism, service, None, False, Reason.MALFORMED)
            return json_reply(200, _outcome(step))
        keys = self._door.keys(f"{caller} {step.bearer.identity or ''}", None)
        verdict = when_ready(self._validate(step.bearer, service))
        return verdict.addCallback(self._held, exchange, mechanism, service, keys)

    def _held(self, verdict: Verdict, exchange: ServerExchange, mechanism: str, service: str, keys: list[Key]
              ) -> Reply | defer.Deferred[Reply]:
        """The answer, a failure's held for its delay (as on the Dovecot socket); none for a
        temporary failure, which says nothing of the token."""
        reply = self._decided(verdict, exchange, mechanism, service)
        if verdict.unavailable is not None:
            return reply
        return self._door.hold(self._door.outcome(keys, ok=verdict.accepted), reply)

    def _decided(self, verdict: Verdict, exchange: ServerExchange, mechanism: str, service: str) -> Reply:
        unavailable = verdict.unavailable
        self._record(mechanism, service, verdict.username, verdict.accepted, unavailable or verdict.reason)
        if verdict.accepted:
            exchange.accept()
            if verdict.family is not None and self._uses is not None:
                self._uses.note(verdict.family, service, None)
            return json_reply(200, {"result": "ok", "username": verdict.username})
        if unavailable is not None:  # no error challenge: the client must keep its token and retry
            return json_reply(200, {"result": "failure", "challenge": None, "reason": unavailable, "temporary": True})
        step = exchange.reject(verdict.status, verdict.scope, verdict.reason)
        return json_reply(200, {**_outcome(step), "reason": verdict.reason})

    def _record(self, mechanism: str, service: str, user: str | None, ok: bool, reason: Reason | str) -> None:
        # repr(): the service name comes from the caller and must not forge log lines.
        log.info("auth {result}: user={user!r} service={service!r} mechanism={mechanism} reason={reason}",
                 result="ok" if ok else "failed", user=user, service=service, mechanism=mechanism, reason=reason)
        self._metrics.sasl_decision("http", self._services, mechanism, service, ok, reason)

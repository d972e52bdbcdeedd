"""What the operator's monitoring reads: /metrics for Prometheus and /healthz."""

from __future__ import annotations

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bearerbridge.metrics import Metrics
from bearerbridge.storage.models import Token
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.site import AsyncResource, Reply, bearer_token


class MetricsResource(AsyncResource):
    """/metrics, readable with a bearer token holding the `metrics` scope (RFC 6750 §3 errors)."""

    def __init__(self, pool: StorePool, metrics: Metrics) -> None:
        super().__init__()
        self._pool = pool
        self._metrics = metrics

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def _get(self, request: Request) -> Reply | defer.Deferred[Reply]:
        token = bearer_token(request)
        if token is None:
            return Reply(401, b"", {b"WWW-Authenticate": b'Bearer realm="metrics"'})
        return self._pool.run(self._pool.store.find_access_token, token).addCallback(self._decide)

    def _decide(self, token: Token | None) -> Reply:
        if token is None or not token.is_active():
            return Reply(401, b"", {b"WWW-Authenticate": b'Bearer realm="metrics", error="invalid_token"'})
        if "metrics" not in token.scope.split():
            return Reply(403, b"", {b"WWW-Authenticate":
                                    b'Bearer realm="metrics", error="insufficient_scope", scope="metrics"'})
        return Reply(200, self._metrics.render(), {b"Content-Type": METRICS_CONTENT_TYPE.encode()})


class Health(AsyncResource):
    """/healthz: 200 while the database takes a write within `[database] deadline`; 503 when it
    does not, or when the pool is stalled (a call has waited past the deadline), at once."""

    def __init__(self, pool: StorePool) -> None:
        super().__init__()
        self._pool = pool

    def render_GET(self, request: Request) -> int:
        return self._answer(request, self._get)

    def _get(self, request: Request) -> Reply | defer.Deferred[Reply]:
        if self._pool.stalled():
            return Reply(503, b"the database is not keeping up\n", {b"Content-Type": b"text/plain"})
        return self._pool.run(self._pool.store.check_writable).addCallback(
            lambda _: Reply(200, b"ok\n", {b"Content-Type": b"text/plain"}))

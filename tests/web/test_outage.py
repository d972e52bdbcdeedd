"""A database that is gone: every endpoint answers its protocol's 'try later', and keeps serving."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from treq.testing import StubTreq
from twisted.logger import capturedLogs

from bearerbridge import config, tap
from bearerbridge.crypto import Keyring
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.grants import GRANT_TYPES
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.models import Client, Token
from bearerbridge.storage.recent import RecentReads
from bearerbridge.web.site import AsyncResource

from ..fakes import DeadPool, MemoryAudit


def dead_root(memory: RecentReads | None = None, metrics: Metrics | None = None):
    """The whole HTTP tree over a database that is gone."""
    settings = config.Config()
    store = SimpleNamespace(keyring=Keyring(b"k" * 32), recent=memory or RecentReads(60.0))
    pool = DeadPool(store)
    return tap.http_root(settings, pool, metrics or Metrics(), Validator(pool, settings.sasl), MemoryAudit())


@pytest.fixture
def http():
    return StubTreq(dead_root())


@pytest.mark.parametrize("path", ["/token", "/introspect", "/revoke"])
def test_json_endpoints_answer_temporarily_unavailable(http, path):
    d = http.post(f"http://127.0.0.1:8080{path}", data={"grant_type": "client_credentials", "token": "t"})
    results = []
    d.addCallback(lambda r: r.content().addCallback(lambda body: results.append((r.code, body))))
    http.flush()
    code, body = results[0]
    assert code == 503 and json.loads(body)["error"] == "temporarily_unavailable"


def test_pages_and_health_answer_503(http):
    results = []
    for path in ("/authorize?response_type=code&client_id=x", "/healthz"):
        d = http.get(f"http://127.0.0.1:8080{path}")
        d.addCallback(lambda r, path=path: r.content().addCallback(lambda body: results.append((path, r.code, body))))
    http.flush()
    assert [(path, code) for path, code, _ in results] == [
        ("/authorize?response_type=code&client_id=x", 503), ("/healthz", 503)]
    assert b"temporarily_unavailable" in results[0][2]


def test_introspection_of_a_remembered_token_needs_no_database():
    """The memory of recent reads answers introspection on its own: the pool here is dead."""
    keyring = Keyring(b"k" * 32)
    memory = RecentReads(60.0)
    rs = Client("rs", "Resource server", (), "imap", ("client_credentials",), False, resource_server=True,
                secret_digest=keyring.digest("rs-secret"), digest=keyring.digest)
    token = Token(id=1, client_id="app", user_id=7, username="alice", email=None, scope="imap",
                  issued_at=int(time.time()), expires_at=int(time.time()) + 600, refresh_expires_at=None,
                  revoked=False, rotated=False, family="f")
    memory.remember_client(rs, 0)
    memory.remember_token(keyring.digest("remembered"), token, 0)
    http = StubTreq(dead_root(memory))
    results = []
    for token_string in ("remembered", "never-seen"):
        d = http.post("http://127.0.0.1:8080/introspect", data={"token": token_string}, auth=("rs", "rs-secret"))
        d.addCallback(lambda r: r.content().addCallback(lambda body: results.append((r.code, json.loads(body)))))
    http.flush()
    assert results[0] == (200, {**results[0][1], "active": True, "username": "alice", "scope": "imap"})
    assert results[1][0] == 503  # a token not in memory goes to the (dead) database



def test_a_handler_that_raises_at_once_gets_our_answer_not_twisteds():
    class Broken(AsyncResource):
        def render_GET(self, request):
            return self._answer(request, lambda request: {}["missing"])

    root = dead_root()
    root.putChild(b"broken", Broken())
    http = StubTreq(root)
    results = []
    http.get("http://127.0.0.1:8080/broken").addCallback(
        lambda r: r.content().addCallback(lambda body: results.append((r.code, r.headers, body))))
    with capturedLogs():
        http.flush()
    code, headers, body = results[0]
    assert code == 503 and json.loads(body)["error"] == "temporarily_unavailable"
    assert headers.getRawHeaders("X-Frame-Options") == ["DENY"]


@pytest.mark.parametrize("grant_type", [*GRANT_TYPES, "password"])
def test_token_requests_are_counted_by_grant_even_when_refused(grant_type):
    metrics = Metrics()
    http = StubTreq(dead_root(metrics=metrics))
    http.post("http://127.0.0.1:8080/token", data={"grant_type": grant_type})
    http.flush()
    label = grant_type if grant_type != "password" else "other"  # a grant we do not serve
    assert metrics.registry.get_sample_value("bearerbridge_token_requests_total", {"grant_type": label}) == 1

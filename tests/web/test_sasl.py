"""POST /sasl on its own: a real store and OAuth server, a validator the test decides for."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from bearerbridge import config
from bearerbridge.guard import MemoryDoor
from bearerbridge.metrics import Metrics
from bearerbridge.oauth.server import BridgeServer
from bearerbridge.sasl.verdict import Verdict
from bearerbridge.storage.models import Client
from bearerbridge.web.sasl import SaslEndpoint
from bearerbridge.web.token import ClientAuthThrottle

from ..fakes import MemoryAudit, SyncPool, sqlite_store

MESSAGE = base64.b64encode(b"n,,\x01auth=Bearer tok\x01\x01").decode()
XOAUTH2 = base64.b64encode(b"user=alice\x01auth=Bearer tok\x01\x01").decode()


@pytest.fixture
def post(tmp_path):
    """post(verdict, mechanisms, **form) -> (status, JSON answer), as the registered client "caller"."""
    settings = config.Config()
    store = sqlite_store(tmp_path / "sasl.db")
    with store.transaction():
        store.add_client(Client("caller", "Caller", (), "imap", ("client_credentials",), False), "secret")
    metrics = Metrics()
    pool = SyncPool(store)
    server = BridgeServer(store, settings, MemoryAudit(), metrics)
    clock = Clock()

    def post(verdict, mechanisms=settings.sasl.offered, **form):
        sasl = dataclasses.replace(settings.sasl, mechanisms=mechanisms)
        throttle = ClientAuthThrottle(MemoryDoor("clients", settings.throttle.clients, metrics, MemoryAudit(), clock))
        door = MemoryDoor("sasl", settings.throttle.sasl, metrics, MemoryAudit(), clock)
        http = StubTreq(SaslEndpoint(settings.server.issuer, pool, server, lambda bearer, service: verdict, sasl,
                                     metrics, throttle, door))
        answers = []
        d = http.post("http://127.0.0.1:8080/sasl", data=form, auth=("caller", "secret"))
        d.addCallback(lambda r: r.json().addCallback(lambda body: answers.append((r.code, body))))
        http.flush()
        clock.advance(settings.throttle.sasl.max_delay)  # a failure is answered late
        http.flush()
        return answers[0]
    yield post
    store.engine.dispose()


@pytest.mark.parametrize("verdict, reason", [
    (Verdict(False, temporary=True, reason="database_unavailable"), "database_unavailable"),
    (Verdict(True, username=None, reason="ok"), "no user name for token"),  # a broken validator
])
def test_without_an_answer_it_asks_to_retry_and_sends_no_challenge(post, verdict, reason):
    """No error challenge, which would tell the client its token is bad and make it throw a good one away."""
    assert post(verdict, mechanism="OAUTHBEARER", service="imap", message=MESSAGE) == (
        200, {"result": "failure", "challenge": None, "reason": reason, "temporary": True})


def test_only_the_configured_mechanisms_are_accepted(post):
    good = Verdict(True, username="alice", reason="ok")
    assert post(good, ("OAUTHBEARER", "XOAUTH2"), mechanism="XOAUTH2", service="imap", message=XOAUTH2) == (
        200, {"result": "ok", "username": "alice"})
    status, answer = post(good, ("OAUTHBEARER",), mechanism="XOAUTH2", service="imap", message=XOAUTH2)
    assert status == 400 and answer["error"] == "invalid_request" and "OAUTHBEARER" in answer["error_description"]

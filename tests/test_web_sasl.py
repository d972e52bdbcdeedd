"""POST /sasl on its own: a real store and OAuth server, a validator the test decides for."""

from __future__ import annotations

import base64

import pytest
from treq.testing import StubTreq

from bearerbridge import config, migrations, oauth, web
from bearerbridge.metrics import Metrics
from bearerbridge.crypto import Keyring
from bearerbridge.models import Client
from bearerbridge.store import SqlStore, make_engine
from bearerbridge.verdict import Verdict
from bearerbridge.web_sasl import SaslEndpoint

from .support import SyncPool

MESSAGE = base64.b64encode(b"n,,\x01auth=Bearer tok\x01\x01").decode()
XOAUTH2 = base64.b64encode(b"user=alice\x01auth=Bearer tok\x01\x01").decode()


@pytest.fixture
def post(tmp_path):
    """post(verdict, mechanisms, **form) -> (status, JSON answer), as the registered client "caller"."""
    engine = make_engine(f"sqlite:///{tmp_path / 'sasl.db'}")
    migrations.upgrade(engine)
    settings = config.Config()
    store = SqlStore(engine, Keyring(b"k" * 32))
    with store.transaction():
        store.add_client(Client("caller", "Caller", (), "imap", ("client_credentials",), False), "secret")
    metrics = Metrics()
    app = web.App(settings, store.keyring, SyncPool(store), oauth.BridgeServer(store, settings, metrics), metrics)

    def post(verdict, mechanisms=settings.sasl.offered, **form):
        root = web.root(app)
        root.putChild(b"sasl", SaslEndpoint(app, lambda bearer, service: verdict, settings.sasl.services, mechanisms))
        http = StubTreq(root)
        answers = []
        d = http.post("http://127.0.0.1:8080/sasl", data=form, auth=("caller", "secret"))
        d.addCallback(lambda r: r.json().addCallback(lambda body: answers.append((r.code, body))))
        http.flush()
        return answers[0]
    yield post
    engine.dispose()


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

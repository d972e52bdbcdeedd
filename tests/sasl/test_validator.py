"""The one SASL decision: `judge` on its own, and `Validator` with its memory over a real SQLite store."""

from __future__ import annotations

import dataclasses
import time

import pytest
from twisted.internet import defer, task

from bearerbridge.config import SaslSettings
from bearerbridge.crypto import Keyring
from bearerbridge.sasl import validator as validator_module
from bearerbridge.sasl.judge import judge
from bearerbridge.sasl.mechanisms import Bearer
from bearerbridge.sasl.validator import Validator
from bearerbridge.sasl.verdict import Verdict
from bearerbridge.storage import migrations
from bearerbridge.storage.models import Client, Token
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.store import SqlStore, make_engine

from ..fakes import SyncPool

SETTINGS = SaslSettings(identity=("username", "email"), plain=("imap",))
TOKEN = Token(id=1, client_id="app", user_id=7, username="alice", email="Alice@Example.org", scope="imap smtp",
              issued_at=1000, expires_at=5000, refresh_expires_at=None, revoked=False, rotated=False, family="f")


def bearer(identity=None, mechanism="OAUTHBEARER"):
    return Bearer(mechanism, identity, "tok")


@pytest.mark.parametrize("token, identity, service, mechanism, expected", [
    (TOKEN, None, "imap", "OAUTHBEARER", (True, "ok", None)),
    (TOKEN, "alice", "smtp", "XOAUTH2", (True, "ok", None)),
    (TOKEN, "alice@example.ORG", "imap", "OAUTHBEARER", (True, "ok", None)),    # email, any case
    (TOKEN, "alice", "imap", "PLAIN", (True, "ok", None)),
    (TOKEN, "alice", "smtp", "PLAIN", (False, "plain_not_allowed", "invalid_request")),
    (TOKEN, "bob", "imap", "OAUTHBEARER", (False, "identity_mismatch", "invalid_token")),
    (TOKEN, None, "xmpp", "OAUTHBEARER", (False, "insufficient_scope", "insufficient_scope")),
    (TOKEN, None, "pop3", "OAUTHBEARER", (False, "unknown_service", "invalid_request")),
    (None, None, "imap", "OAUTHBEARER", (False, "unknown", "invalid_token")),
    (dataclasses.replace(TOKEN, revoked=True), None, "imap", "OAUTHBEARER", (False, "revoked", "invalid_token")),
    (dataclasses.replace(TOKEN, user_disabled=True), None, "imap", "OAUTHBEARER",
     (False, "user_disabled", "invalid_token")),
    (dataclasses.replace(TOKEN, expires_at=2000), None, "imap", "OAUTHBEARER", (False, "expired", "invalid_token")),
    (dataclasses.replace(TOKEN, user_id=None, username=None), None, "imap", "OAUTHBEARER",
     (False, "no_user", "invalid_token")),
])
def test_judge(token, identity, service, mechanism, expected):
    verdict = judge(token, 3000, bearer(identity, mechanism), service, SETTINGS)
    assert (verdict.ok, verdict.reason, None if verdict.ok else verdict.status) == expected
    if verdict.ok:
        assert verdict.username == "alice"
    if verdict.reason == "insufficient_scope":
        assert verdict.scope == "xmpp"


def test_identity_as_user_at_realm():
    settings = SaslSettings(identity=("user@realm",), realm="example.net")
    assert judge(TOKEN, 3000, bearer("alice@example.net"), "imap", settings).ok
    for other in ("alice", "alice@example.org", "Alice@example.net"):  # only the one form, exactly
        assert judge(TOKEN, 3000, bearer(other), "imap", settings).reason == "identity_mismatch"


@pytest.mark.parametrize("form, expected", [
    ("username", "alice@corp"), ("email", "Alice@Example.org"), ("localpart", "alice"),
    ("user@realm", "alice@corp@example.net"),
])
def test_reported_name_per_service(form, expected):
    settings = SaslSettings(usernames={"xmpp": form}, realm="example.net")
    token = dataclasses.replace(TOKEN, username="alice@corp", scope="xmpp")
    assert judge(token, 3000, bearer(), "xmpp", settings).username == expected


@pytest.fixture
def world(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'v.db'}")
    migrations.upgrade(engine)
    clock = task.Clock()
    clock.rightNow = time.time()  # the stored tokens' expiry is wall-clock time
    store = SqlStore(engine, Keyring(b"k" * 32), RecentReads(1.0, clock.seconds))
    with store.transaction():
        user = store.add_user("alice", None, None)
        store.add_client(Client("app", "App", (), "imap", ("client_credentials",), False), "s")
        store.save_token("good", None, "app", user.id, "imap", 3600, None)
        store.save_token("other", None, "app", user.id, "imap", 3600, None)
    pool = SyncPool(store)
    yield store, pool, clock, Validator(pool, SaslSettings(cache_ttl=1.0), clock=clock)
    engine.dispose()


def check(validator, token="good", service="imap"):
    results = []
    defer.maybeDeferred(validator.validate, Bearer("OAUTHBEARER", None, token), service).addCallback(results.append)
    return results[0]


def test_recent_tokens_are_answered_from_memory_for_cache_ttl(world):
    store, pool, clock, validator = world
    assert isinstance(validator.validate(Bearer("OAUTHBEARER", None, "good"), "imap"), defer.Deferred)
    assert pool.hops == 1
    # Remembered: the verdict itself, no Deferred and no hop.
    remembered = validator.validate(Bearer("OAUTHBEARER", None, "good"), "imap")
    assert isinstance(remembered, Verdict) and remembered.ok
    assert check(validator).ok and check(validator, service="smtp").reason == "insufficient_scope"
    assert pool.hops == 1
    clock.advance(1.01)
    assert check(validator).ok and pool.hops == 2


def test_a_revocation_in_this_process_takes_effect_at_once(world):
    store, pool, clock, validator = world
    assert check(validator).ok
    with store.transaction():
        store.revoke_token(store.find_access_token("good").id)
    assert check(validator).reason == "revoked"


def test_a_revocation_in_another_process_takes_effect_within_cache_ttl(world, tmp_path):
    store, pool, clock, validator = world
    assert check(validator).ok
    elsewhere = SqlStore(make_engine(f"sqlite:///{tmp_path / 'v.db'}"), Keyring(b"k" * 32), RecentReads(1.0))
    with elsewhere.transaction():
        elsewhere.set_disabled("alice", True)
    assert check(validator).ok          # still remembered...
    clock.advance(1.0)
    assert check(validator).reason == "revoked"  # ...for at most cache_ttl (disabling revokes the tokens)


def test_a_token_in_use_is_read_again_before_it_expires(world, tmp_path):
    store, pool, clock, validator = world
    good = Bearer("OAUTHBEARER", None, "good")
    assert check(validator).ok and pool.hops == 1
    clock.advance(0.6)  # past half of cache_ttl: answered at once, and read again behind the answer
    pool.held = []
    assert validator.validate(good, "imap").ok and pool.hops == 2
    assert validator.validate(good, "imap").ok and pool.hops == 2  # one re-read at a time
    elsewhere = SqlStore(make_engine(f"sqlite:///{tmp_path / 'v.db'}"), Keyring(b"k" * 32), RecentReads(1.0))
    with elsewhere.transaction():
        elsewhere.set_disabled("alice", True)
    d, result = pool.held.pop()
    d.callback(result)  # the re-read was made before the change: still good, renewed at 0.6
    pool.held = None
    clock.advance(0.6)  # 1.2 s after the first read: a miss without the re-read
    verdict = validator.validate(good, "imap")
    assert isinstance(verdict, Verdict) and verdict.ok and pool.hops == 3
    assert check(validator).reason == "revoked"  # the third read saw the change (disabling revokes)


def test_misses_are_read_before_renewals(world, monkeypatch):
    store, pool, clock, validator = world
    monkeypatch.setattr(validator_module, "MAX_BATCH", 1)
    assert check(validator, "good").ok and check(validator, "other").ok and pool.hops == 2
    clock.advance(0.6)
    pool.held = []
    validator.validate(Bearer("OAUTHBEARER", None, "good"), "imap")    # renewal, read at once
    validator.validate(Bearer("OAUTHBEARER", None, "other"), "imap")   # renewal, queued
    waiting = validator.validate(Bearer("OAUTHBEARER", None, "nope"), "imap")  # a miss, queued after it
    read = []
    pool.run = (lambda run: lambda fn, digests: read.append(len(digests)) or run(fn, digests))(pool.run)
    d, result = pool.held.pop()
    d.callback(result)
    assert len(pool.held) == 1 and not waiting.called
    d, result = pool.held.pop()
    d.callback(result)
    assert waiting.called  # the miss went before the renewal queued ahead of it
    assert read == [1, 1] and len(pool.held) == 1


def test_a_failed_renewal_is_not_retried_on_every_hit(world):
    store, pool, clock, validator = world
    good = Bearer("OAUTHBEARER", None, "good")
    assert check(validator).ok and pool.hops == 1
    clock.advance(0.6)
    pool.broken = True
    assert validator.validate(good, "imap").ok and pool.hops == 2  # the renewal fails...
    assert validator.validate(good, "imap").ok and pool.hops == 2  # ...and is not asked again at once
    clock.advance(0.4)  # the record is cache_ttl old: a miss, which does ask, and gets a temporary verdict
    assert check(validator).reason == "database_unavailable" and pool.hops == 3


def test_a_renewal_sees_a_revocation(world):
    store, pool, clock, validator = world
    assert check(validator).ok
    elsewhere = SqlStore(store.engine, Keyring(b"k" * 32), RecentReads(1.0))  # another process, its own memory
    with elsewhere.transaction():
        elsewhere.revoke_token(elsewhere.find_access_token("good").id)
    clock.advance(0.6)
    assert check(validator).ok  # remembered, and renewed behind the answer...
    assert check(validator).reason == "revoked"  # ...which saw the revocation, before cache_ttl


def test_a_lookup_the_caller_gives_up_on_is_not_called_an_outage(world):
    store, pool, clock, validator = world
    pool.held = []
    d = validator.validate(Bearer("OAUTHBEARER", None, "good"), "imap")
    outcomes = []
    d.addBoth(outcomes.append)
    d.cancel()  # as Deferred.addTimeout does
    assert outcomes[0].check(defer.CancelledError)
    late, result = pool.held.pop()
    late.callback(result)  # the lookup lands after all: nothing left to answer, and no error
    assert len(outcomes) == 1 and check(validator).ok


def test_unknown_tokens_are_not_remembered(world):
    store, pool, clock, validator = world
    assert check(validator, "guess-1").reason == "unknown"
    assert check(validator, "guess-1").reason == "unknown"
    assert pool.hops == 2


def test_concurrent_misses_share_one_lookup(world):
    store, pool, clock, validator = world
    pool.held = []
    first = validator.validate(Bearer("OAUTHBEARER", None, "good"), "imap")
    waiting = [validator.validate(Bearer("OAUTHBEARER", None, t), "imap") for t in ("other", "good", "nope")]
    assert pool.hops == 1
    d, result = pool.held.pop()
    d.callback(result)                 # the first lookup lands; the three waiting go out together
    assert pool.hops == 2
    d, result = pool.held.pop()
    d.callback(result)
    outcomes = []
    for each in [first, *waiting]:
        defer.maybeDeferred(lambda each=each: each).addCallback(lambda v: outcomes.append(v.reason))
    assert outcomes == ["ok", "ok", "ok", "unknown"]


def test_a_database_outage_gives_a_temporary_verdict(world):
    store, pool, clock, validator = world
    pool.broken = True
    verdict = check(validator)
    assert not verdict.ok and verdict.temporary and verdict.reason == "database_unavailable"
    pool.broken = False
    assert check(validator).ok

"""When grants were last used (uses.py): the latest use of each grant and service kept in bounded
memory, written behind in one trip to the pool a batch, dropped (counted, logged once) when the
database fails, written when the service stops; and the Dovecot socket noting an accepted login
with Dovecot's `rip`, never a refused one. All in process, on a Clock."""

from __future__ import annotations

import base64
import dataclasses
import time

import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs

from bearerbridge import uses as uses_module
from bearerbridge.config import SaslSettings
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.dovecot import DovecotAuthProtocol
from bearerbridge.sasl.judge import judge_token
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.models import Client, Token
from bearerbridge.storage.schema import token_uses
from bearerbridge.storage.store import SqlStore
from bearerbridge.uses import FLUSH_EVERY, LastUses, UseRecorder

from .fakes import SyncPool, sqlite_store


def written(store: SqlStore) -> set[tuple]:
    """Every row of token_uses: (family, service, last_used_at, address)."""
    with store.engine.connect() as db:
        return {tuple(row) for row in db.execute(sa.select(token_uses))}


def family_of(store: SqlStore, token: str) -> str:
    with store.transaction():
        found = store.find_access_token(token)
    assert found is not None
    return found.family


# -- LastUses: what is noted, in memory ------------------------------------------------------------

def test_the_latest_address_of_each_grant_at_each_service_is_kept_until_taken():
    uses = LastUses()
    uses.note("f1", "imap", "192.0.2.1")
    uses.note("f1", "imap", "192.0.2.2")
    uses.note("f1", "smtp", None)
    uses.note("f2", "imap", "198.51.100.7")
    assert uses.take() == ({("f1", "imap"): "192.0.2.2", ("f1", "smtp"): None, ("f2", "imap"): "198.51.100.7"}, 0)
    assert uses.take() == ({}, 0)  # taken: the memory starts afresh


def test_a_full_memory_still_updates_what_it_holds_and_counts_each_use_it_cannot():
    uses = LastUses(limit=2)
    uses.note("f1", "imap", None)
    uses.note("f2", "imap", None)
    uses.note("f3", "imap", None)  # no room
    uses.note("f3", "smtp", None)  # nor here
    uses.note("f1", "imap", "192.0.2.1")  # held already: updated
    assert len(uses) == 2
    assert uses.take() == ({("f1", "imap"): "192.0.2.1", ("f2", "imap"): None}, 2)
    uses.note("f3", "imap", None)  # room again
    assert uses.take() == ({("f3", "imap"): None}, 0)


# -- UseRecorder: written behind -------------------------------------------------------------------

@pytest.fixture
def world(tmp_path):
    store = sqlite_store(tmp_path / "uses.db")
    pool, metrics, clock = SyncPool(store), Metrics(), Clock()
    clock.rightNow = 1_700_000_000.0
    uses = LastUses()
    recorder = UseRecorder(uses, pool, metrics, clock=clock)
    recorder.startService()
    yield store, pool, metrics, clock, uses, recorder
    if recorder.running:
        recorder.stopService()
    store.engine.dispose()


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_uses_are_written_every_few_seconds_in_one_trip_to_the_pool(world):
    store, pool, metrics, clock, uses, _ = world
    clock.advance(FLUSH_EVERY)
    assert pool.hops == 0  # nothing noted, no trip
    uses.note("f1", "imap", "192.0.2.1")
    uses.note("f1", "smtp", "2001:db8::7")
    uses.note("f2", "xmpp", None)
    clock.advance(FLUSH_EVERY - 0.5)
    assert written(store) == set()
    clock.advance(0.5)
    at = 1_700_000_000 + 2 * int(FLUSH_EVERY)  # dated when taken: at most FLUSH_EVERY late
    assert written(store) == {("f1", "imap", at, "192.0.2.1"), ("f1", "smtp", at, "2001:db8::7"),
                              ("f2", "xmpp", at, None)}
    assert pool.hops == 1
    assert count(metrics, "bearerbridge_uses_recorded_total") == 3


def test_a_batch_in_flight_is_not_joined_by_the_next_and_no_second_write_starts_meanwhile(world):
    store, pool, _, clock, uses, _ = world
    pool.held = []  # the pool's answer waits until the test releases it
    uses.note("f1", "imap", None)
    clock.advance(FLUSH_EVERY)
    assert pool.hops == 1 and len(pool.held) == 1
    uses.note("f2", "imap", None)  # while the first write is in flight
    clock.advance(FLUSH_EVERY)
    assert pool.hops == 1  # the timer waits for the write in flight
    d, result = pool.held.pop()
    d.callback(result)
    clock.advance(FLUSH_EVERY)
    assert pool.hops == 2
    pool.held.pop()[0].callback(1)
    assert {row[0] for row in written(store)} == {"f1", "f2"}


def test_a_failed_write_drops_its_batch_counts_it_and_is_logged_once(world):
    store, pool, metrics, clock, uses, _ = world
    pool.broken = True
    with capturedLogs() as events:
        for family in ("f1", "f2", "f3"):
            uses.note(family, "imap", None)
            uses.note(family, "smtp", None)
            clock.advance(FLUSH_EVERY)
        errors = [e for e in events if e["log_level"] is LogLevel.error]
        assert len(errors) == 1 and "2 dropped" in errors[0]["log_format"].format(**errors[0])
        assert count(metrics, "bearerbridge_uses_lost_total", why="database") == 6
        pool.broken = False
        uses.note("f4", "imap", None)
        clock.advance(FLUSH_EVERY)
        assert any("works again" in e["log_format"] for e in events)
    assert {row[0] for row in written(store)} == {"f4"}  # the dropped batches are gone for good
    assert len(uses) == 0


def test_a_large_batch_goes_in_chunks_one_after_another_and_a_failure_drops_the_rest(world, monkeypatch):
    store, pool, metrics, clock, uses, _ = world
    monkeypatch.setattr(uses_module, "CHUNK", 2)
    pool.held = []
    for family in ("f1", "f2", "f3", "f4", "f5"):
        uses.note(family, "imap", None)
    clock.advance(FLUSH_EVERY)
    assert pool.hops == 1  # the next chunk waits for this one: logins' reads go in between
    d, result = pool.held.pop()
    d.callback(result)
    assert pool.hops == 2
    pool.broken = True
    pool.held.pop()[0].callback(2)  # the second chunk written; the third fails
    assert pool.hops == 3 and len({row[0] for row in written(store)}) == 4
    assert count(metrics, "bearerbridge_uses_recorded_total") == 4
    assert count(metrics, "bearerbridge_uses_lost_total", why="database") == 1


def test_a_full_memory_is_counted_when_written_and_warned_of_once(world):
    _, _, metrics, clock, uses, recorder = world
    uses.limit = 1
    with capturedLogs() as events:
        for _ in range(2):
            uses.note("f1", "imap", None)
            uses.note("f2", "imap", None)
            clock.advance(FLUSH_EVERY)
    assert count(metrics, "bearerbridge_uses_lost_total", why="full") == 2
    assert len([e for e in events if e["log_level"] is LogLevel.warn]) == 1


def test_stopping_writes_what_is_pending_and_the_timer_stops(world):
    store, pool, _, clock, uses, recorder = world
    uses.note("f1", "imap", None)
    done = []
    recorder.stopService().addCallback(done.append)
    assert done == [None]
    assert {row[0] for row in written(store)} == {"f1"}
    uses.note("f2", "imap", None)
    clock.advance(10 * FLUSH_EVERY)
    assert {row[0] for row in written(store)} == {"f1"}  # no timer any more


def test_a_recorder_never_started_stops_quietly(world):
    store, pool, metrics, _, uses, _ = world
    uses.note("f1", "imap", None)
    done = []
    UseRecorder(uses, pool, metrics).stopService().addCallback(done.append)
    assert done == [None] and pool.hops == 0


def test_only_an_accepted_verdict_names_its_grant():
    token = Token(id=1, client_id="app", user_id=7, username="alice", email=None, scope="imap", issued_at=0,
                  expires_at=2**40, refresh_expires_at=None, revoked=False, rotated=False, family="f")
    accepted = judge_token(token, 1.0, None, "imap", SETTINGS)
    assert (accepted.accepted, accepted.username, accepted.reason, accepted.family) == (True, "alice", "ok", "f")
    assert judge_token(token, 1.0, None, "smtp", SETTINGS).family is None  # insufficient scope
    assert judge_token(token, 1.0, "bob", "imap", SETTINGS).family is None
    nameless = judge_token(dataclasses.replace(token, username=""), 1.0, None, "imap", SETTINGS)
    assert not nameless.accepted and nameless.family is None  # no one to log in as: no use either


# -- the Dovecot socket ------------------------------------------------------------------------------

SETTINGS = SaslSettings(plain=("imap",), cache_ttl=1.0)


@pytest.fixture
def socket(tmp_path):
    """A Dovecot auth connection over the real validator and a SQLite store: alice's `imap` token
    `good`, and `smtp-only`."""
    store = sqlite_store(tmp_path / "dovecot.db")
    with store.transaction():
        alice = store.add_user("alice", "alice@example.org", None)
        store.add_client(Client("app", "App", (), "imap smtp", ("authorization_code",), False), "s")
        store.save_token("good", None, "app", alice.id, "imap", 3600, None)
        store.save_token("smtp-only", None, "app", alice.id, "smtp", 3600, None)
    pool, clock = SyncPool(store), Clock()
    clock.rightNow = time.time()  # the tokens' expiry is wall-clock time
    uses = LastUses()
    protocol = DovecotAuthProtocol(Validator(pool, SETTINGS, clock=clock).validate, clock=clock, uses=uses)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"VERSION\t1\t0\nCPID\t1\n")
    transport.clear()

    def login(request_id: str, token: str, mechanism: str = "OAUTHBEARER", service: str = "imap",
              rip: str = "192.0.2.7") -> bytes:
        if mechanism == "PLAIN":
            message = f"\x00alice\x00{token}"
        else:
            message = f"n,a=alice,\x01host=mail.example\x01port=993\x01auth=Bearer {token}\x01\x01"
        resp = base64.b64encode(message.encode()).decode()
        protocol.dataReceived(f"AUTH\t{request_id}\t{mechanism}\tservice={service}\tlip=127.0.0.1\trip={rip}"
                              f"\tresp={resp}\n".encode())
        answer = transport.value()
        transport.clear()
        return answer

    yield store, pool, clock, uses, login
    protocol.connectionLost()
    store.engine.dispose()


def test_a_login_on_the_dovecot_socket_is_written_with_its_service_and_rip(socket):
    store, pool, clock, uses, login = socket
    assert login("1", "good") == b"OK\t1\tuser=alice\n"  # read from the store
    assert login("2", "good", rip="2001:db8::1:7") == b"OK\t2\tuser=alice\n"  # from memory, the latest
    assert login("3", "good", "PLAIN", rip="192.0.2.8") == b"OK\t3\tuser=alice\n"
    assert login("4", "smtp-only", service="smtp") == b"OK\t4\tuser=alice\n"
    UseRecorder(uses, pool, Metrics(), clock=clock).flush()
    at = int(clock.seconds())
    assert written(store) == {(family_of(store, "good"), "imap", at, "192.0.2.8"),
                              (family_of(store, "smtp-only"), "smtp", at, "192.0.2.7")}


def test_a_refused_login_on_the_dovecot_socket_writes_nothing(socket):
    store, pool, _, uses, login = socket
    assert login("1", "unknown").startswith(b"CONT\t1\t")  # the RFC 7628 error round
    assert login("2", "smtp-only").startswith(b"CONT\t2\t")  # not for imap
    assert login("3", "good", service="smtp").startswith(b"CONT\t3\t")
    assert login("4", "good", service="pop3").startswith(b"CONT\t4\t")  # no such service
    assert login("5", "smtp-only", "PLAIN", service="smtp").startswith(b"FAIL\t5\t")  # no PLAIN for smtp
    assert len(uses) == 0
    hops = pool.hops
    UseRecorder(uses, pool, Metrics()).flush()
    assert written(store) == set() and pool.hops == hops  # nothing to write: no trip to the pool

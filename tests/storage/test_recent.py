"""The memory of recent reads: fresh for ttl seconds, and only in the generation it was read in."""

from __future__ import annotations

import pytest

from bearerbridge.storage import recent
from bearerbridge.storage.models import Client, Token
from bearerbridge.storage.recent import RecentReads

CLIENT = Client("app", "App", (), "imap", ("client_credentials",), False)
TOKEN = Token(id=1, client_id="app", user_id=7, username="alice", email=None, scope="imap", issued_at=0,
              expires_at=10, refresh_expires_at=None, revoked=False, rotated=False, family="f")


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_fresh_for_ttl_seconds():
    clock = Clock()
    memory = RecentReads(1.0, clock)
    memory.remember_client(CLIENT, memory.generation)
    memory.remember_token("d", TOKEN, memory.generation)
    assert memory.client("app") is CLIENT
    clock.now += 0.99
    assert memory.client("app") is CLIENT
    assert memory.token("d") == (TOKEN, pytest.approx(0.99))
    clock.now += 0.02
    assert memory.client("app") is None
    assert memory.token("d") is None


def test_an_invalidation_forgets_at_once():
    memory = RecentReads(1.0, Clock())
    memory.remember_token("d", TOKEN, memory.generation)
    memory.remember_client(CLIENT, memory.generation)
    memory.invalidate()
    assert memory.token("d") is None and memory.client("app") is None


def test_a_read_that_began_before_an_invalidation_is_not_trusted():
    """The store takes the generation before it reads: a revocation committed meanwhile wins."""
    memory = RecentReads(1.0, Clock())
    before = memory.generation
    memory.invalidate()
    memory.remember_token("d", TOKEN, before)
    assert memory.token("d") is None


def test_bounded(monkeypatch):
    monkeypatch.setattr(recent, "LIMIT", 3)
    memory = RecentReads(1.0, Clock())
    for key in "abcd":
        memory.remember_token(key, TOKEN, 0)
    assert memory.token("d") is not None
    assert memory.token("a") is None


def test_only_what_was_remembered_is_recalled():
    memory = RecentReads(1.0, Clock())
    memory.remember_token("tok", TOKEN, 0)
    assert memory.token("other") is None and memory.client("app") is None

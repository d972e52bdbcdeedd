"""The memory of recent reads: fresh for ttl seconds, and only in the generation it was read in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bearerbridge import recent
from bearerbridge.crypto import Keyring
from bearerbridge.recent import NeedsDatabase, RecentReads, RememberedStore


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_fresh_for_ttl_seconds():
    clock = Clock()
    memory = RecentReads(1.0, clock)
    memory.remember("client", "app", "record", generation=3)
    assert memory.recall("client", "app", 3) == "record"
    clock.now += 0.99
    assert memory.recall("client", "app", 3) == "record"
    clock.now += 0.02
    with pytest.raises(NeedsDatabase):
        memory.recall("client", "app", 3)


def test_a_new_generation_forgets_at_once():
    memory = RecentReads(1.0, Clock())
    memory.remember("token", "d", "record", generation=3)
    with pytest.raises(NeedsDatabase):
        memory.recall("token", "d", 4)


def test_bounded(monkeypatch):
    monkeypatch.setattr(recent, "LIMIT", 3)
    memory = RecentReads(1.0, Clock())
    for key in "abcd":
        memory.remember("token", key, key, 0)
    assert memory.recall("token", "d", 0) == "d"
    with pytest.raises(NeedsDatabase):
        memory.recall("token", "a", 0)


def test_remembered_store_answers_only_from_memory():
    keyring = Keyring(b"k" * 32)
    store = SimpleNamespace(keyring=keyring, generation=0)
    memory = RecentReads(1.0, Clock())
    remembered = RememberedStore(store, memory)
    memory.remember("token", keyring.digest("tok"), "the token", 0)
    memory.remember("client", "app", "the client", 0)
    assert remembered.find_access_token("tok") == "the token"
    assert remembered.get_client("app") == "the client"
    for call in (lambda: remembered.find_access_token("other"), lambda: remembered.find_refresh_token("tok")):
        with pytest.raises(NeedsDatabase):
            call()
    store.generation = 1
    with pytest.raises(NeedsDatabase):
        remembered.get_client("app")

"""Signing keys in the database (storage/signing.py), on SQLite and PostgreSQL (conftest.py)."""

from __future__ import annotations

import threading
import time

from bearerbridge.keys import Stage


def ensure(store):
    with store.transaction():
        return store.ensure_signing_keys()


def test_instances_starting_at_once_make_one_set_of_keys(store):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure(store))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert {frozenset(k.kid for k in found) for found in results} == {frozenset(k.kid for k in ensure(store))}
    assert len(ensure(store)) == 4


def test_a_rotation_retires_the_current_keys_and_an_automatic_one_happens_only_when_due(store):
    before = ensure(store)
    with store.transaction():
        assert store.rotate_signing_keys(3600, every=90 * 86400) is False  # the keys are new
    with store.transaction():
        assert store.rotate_signing_keys(3600) is True
    rotated = ensure(store)
    stages = {k.kid: k.stage for k in rotated}
    for key in before:
        assert stages[key.kid] == (Stage.RETIRED if key.stage is Stage.CURRENT else Stage.CURRENT)
    assert sum(k.stage is Stage.NEXT for k in rotated) == 2 and len(rotated) == 6
    retired = [k for k in rotated if k.stage is Stage.RETIRED]
    assert all(abs(k.expires_at - (time.time() + 3600)) < 5 for k in retired)


def test_retired_keys_are_purged_once_their_tokens_have_expired(store):
    ensure(store)
    with store.transaction():
        store.rotate_signing_keys(-10)  # retired keys whose tokens expired ten seconds ago
        assert store.purge_expired() == 2
    assert len(ensure(store)) == 4

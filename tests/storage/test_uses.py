"""When grants were last used, in the database (storage/uses.py): one upsert a batch that keeps
the later time, addresses kept only as addresses, and uses of grants with no token left purged.
On SQLite and PostgreSQL (conftest.py)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import token_uses, tokens
from bearerbridge.storage.uses import stored_address


def record(store, batch) -> int:
    with store.transaction():
        return store.record_uses(batch)


def rows(store) -> dict[tuple[str, str], tuple[int, str | None]]:
    with store.engine.connect() as db:
        return {(r.family, r.service): (r.last_used_at, r.address) for r in db.execute(sa.select(token_uses))}


def test_a_batch_is_written_and_a_later_use_replaces_an_earlier_one_never_the_reverse(store):
    assert record(store, {("f1", "imap"): (100.7, "192.0.2.1"), ("f1", "smtp"): (100, None),
                          ("f2", "imap"): (50, "198.51.100.2")}) == 3
    assert record(store, {("f1", "imap"): (90, "192.0.2.9"),  # older: a batch that was held up
                          ("f2", "imap"): (60, "198.51.100.3")}) == 2
    assert rows(store) == {("f1", "imap"): (100, "192.0.2.1"), ("f1", "smtp"): (100, None),
                           ("f2", "imap"): (60, "198.51.100.3")}
    assert record(store, {}) == 0


@pytest.mark.parametrize("given, kept", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),  # without its zone
    ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),  # how client_address counts IPv6
    ("::ffff:192.0.2.7", "::ffff:c000:207"),
    ("mail.example", None),
    ("192.0.2.7\tuser=root", None),
    ("1" * 100, None),
    ("", None),
    (None, None),
])
def test_only_an_address_is_kept_as_one(store, given, kept):
    assert stored_address(given) == kept
    record(store, {("f", "imap"): (1, given)})
    assert rows(store) == {("f", "imap"): (1, kept)}


def test_a_service_longer_than_its_column_is_cut_and_still_written(store):
    long = "s" * 40
    record(store, {("f", long): (1, None)})
    assert rows(store) == {("f", "s" * 32): (1, None)}


def test_a_large_batch_is_one_statement_in_one_transaction(store):
    batch = {(f"family{i:05}", service): (1000 + i, "192.0.2.1") for i in range(5000) for service in ("imap", "smtp")}
    assert record(store, batch) == 10_000
    assert len(rows(store)) == 10_000


def test_two_writers_of_the_same_grants_at_once_neither_wait_for_each_other_nor_move_a_use_back(store):
    keys = [(f"family{i:04}", "imap") for i in range(300)]
    errors: list[BaseException] = []

    def writer(order: list[tuple[str, str]], base: int) -> None:
        try:
            for lap in range(10):
                record(store, {key: (base + lap, None) for key in order})
        except BaseException as e:  # noqa: B036 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(keys, 1000)),
               threading.Thread(target=writer, args=(keys[::-1], 2000))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert set(rows(store).values()) == {(2009, None)}


def test_uses_of_grants_with_no_token_left_are_purged(store):
    with store.transaction():
        alice = store.add_user("alice", None, None)
        store.add_client(Client("app", "App", (), "imap", ("authorization_code",), False), "s")
        store.save_token("live", None, "app", alice.id, "imap", 3600, None)
        store.save_token("dead", None, "app", alice.id, "imap", 3600, None)
        live, dead = store.find_access_token("live").family, store.find_access_token("dead").family
    record(store, {(live, "imap"): (1, None), (dead, "imap"): (1, None), (dead, "smtp"): (1, None),
                   ("never-issued", "imap"): (1, None)})
    with store.transaction():
        store._db.execute(tokens.update().where(tokens.c.family == dead).values(expires_at=0))
        store.purge_expired()
    assert rows(store) == {(live, "imap"): (1, None)}


def test_a_connected_app_shows_its_latest_use_and_knows_every_instances_address(store):
    with store.transaction():
        alice = store.add_user("alice", None, "hash")
        store.add_client(Client("mail", "Mail", ("https://mail.example/cb",), "imap", ("authorization_code",),
                                public=True), None)
        for access in ("laptop", "phone"):  # two instances of the app, each its own grant's family
            store.save_token(access, None, "mail", alice.id, "imap", 3600, None)
        laptop, phone = (store.find_access_token(a).family for a in ("laptop", "phone"))
    record(store, {(laptop, "imap"): (100, "192.0.2.1"), (phone, "imap"): (200, "198.51.100.2")})
    with store.transaction():
        [app] = store.connected_apps(alice.id)
    assert app.uses["imap"].at == 200 and app.uses["imap"].address == "198.51.100.2"
    assert app.seen_from == {("imap", "192.0.2.1"), ("imap", "198.51.100.2")}

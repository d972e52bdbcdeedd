"""The store on real databases: SQLite files always, PostgreSQL when BEARERBRIDGE_TEST_DATABASE_URL is set."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from bearerbridge.crypto import Keyring
from bearerbridge.storage import migrations
from bearerbridge.storage.models import Client, SignIn
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.schema import metadata
from bearerbridge.storage.store import SqlStore, StoreError, make_engine


def make_client(store: SqlStore, client_id: str = "app", secret: str | None = "s3cret") -> Client:
    client = Client(client_id=client_id, name="App", redirect_uris=("https://app.example/cb",), scope="imap smtp",
                    grant_types=("authorization_code", "refresh_token"), public=secret is None)
    store.add_client(client, secret)
    return store.get_client(client_id)


def test_migrations_match_the_schema_the_code_uses(engine):
    migrations.upgrade(engine)
    migrations.upgrade(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_users(store):
    with store.transaction():
        alice = store.add_user("alice", "alice@example.org", "hash")
        with pytest.raises(StoreError):
            store.add_user("alice", None, None)
        assert store.get_user(alice.id) == alice
        store.set_disabled("alice", True)
        assert store.get_user_by_name("alice").disabled
        store.set_password("alice", "hash2")
        assert store.password_hash("alice")[1] == "hash2"
        with pytest.raises(StoreError):
            store.set_password("nobody", "x")
        assert [u.username for u in store.list_users()] == ["alice"]


def test_client_secrets_are_stored_as_keyed_digests(store, engine):
    with store.transaction():
        client = make_client(store)
    assert client.check_client_secret("s3cret") and not client.check_client_secret("s3cret ")
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT secret_digest FROM clients")).scalar()
    assert "s3cret" not in stored and len(stored) == 64
    other_key = SqlStore(engine, Keyring(b"x" * 32), RecentReads(1.0))
    with other_key.transaction():
        assert not other_key.get_client("app").check_client_secret("s3cret")


def test_tokens_are_stored_as_digests_and_found_by_either_half(store, engine):
    with store.transaction():
        user = store.add_user("bob", None, None)
        make_client(store)
        store.save_token("access-1", "refresh-1", "app", user.id, "imap", 3600, 86400)
        token = store.find_access_token("access-1")
        assert token.username == "bob" and token.scope == "imap" and token.is_active()
        assert store.find_refresh_token("refresh-1").id == token.id
        assert store.find_access_token("refresh-1") is None
    with engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(sa.text("SELECT * FROM tokens")) for v in row)
    assert "access-1" not in dump and "refresh-1" not in dump


def test_codes_are_single_use(store):
    with store.transaction():
        user = store.add_user("carol", None, None)
        make_client(store)
        store.save_code("code-1", "app", user.id, "https://app.example/cb", "imap", "c" * 43, "S256", 2**40)
        code = store.find_code("code-1")
        assert code.client_id == "app" and not code.used
        assert store.use_code(code.code_digest) is True
        assert store.use_code(code.code_digest) is False
        assert store.find_code("code-1").used


def test_revoking_a_family_and_a_code_s_tokens(store):
    with store.transaction():
        user = store.add_user("dan", None, None)
        make_client(store)
        store.save_code("code-2", "app", user.id, "", "imap", None, None, 2**40)
        digest = store.find_code("code-2").code_digest
        store.save_token("a1", "r1", "app", user.id, "imap", 3600, 86400, code_digest=digest)
        first = store.find_access_token("a1")
        store.save_token("a2", "r2", "app", user.id, "imap", 3600, 86400, family=first.family)
        store.save_token("a3", "r3", "app", user.id, "imap", 3600, 86400)  # another grant
        assert store.mark_rotated(first.id) and not store.mark_rotated(first.id)
        assert store.revoke_from_code(digest) == 2
        assert store.find_access_token("a2").revoked
        assert not store.find_access_token("a3").revoked


def test_disabling_a_user_deactivates_their_tokens(store):
    with store.transaction():
        user = store.add_user("erin", None, None)
        make_client(store)
        store.save_token("a", None, "app", user.id, "imap", 3600, None)
        store.set_disabled("erin", True)
        assert not store.find_access_token("a").is_active()


def test_deleting_a_client_deletes_its_codes_tokens_and_consents(store, engine):
    with store.transaction():
        user = store.add_user("fay", None, None)
        make_client(store)
        store.save_code("code-3", "app", user.id, "", "imap", None, None, 2**40)
        store.save_token("a", "r", "app", user.id, "imap", 3600, 86400)
        store.save_consent(user.id, "app", {"imap"})
        assert store.delete_client("app") and not store.delete_client("app")
        assert store.find_access_token("a") is None and store.find_code("code-3") is None
        assert store.consented_scope(user.id, "app") == set()


def test_consents_accumulate(store):
    with store.transaction():
        user = store.add_user("gus", None, None)
        make_client(store)
        store.save_consent(user.id, "app", {"imap"})
        store.save_consent(user.id, "app", {"smtp"})
        assert store.consented_scope(user.id, "app") == {"imap", "smtp"}


def test_purge_removes_only_what_is_dead(store):
    with store.transaction():
        user = store.add_user("hal", None, None)
        make_client(store)
        store.save_code("old", "app", user.id, "", "imap", None, None, 10)
        store.save_code("new", "app", user.id, "", "imap", None, None, 2**40)
        store.save_token("dead", None, "app", user.id, "imap", -10, None)
        store.save_token("refreshable", "r", "app", user.id, "imap", -10, 86400)
        assert store.purge_expired() == 2
        assert store.find_code("new") and store.find_refresh_token("r")


def test_a_failed_transaction_leaves_nothing_behind(store):
    with pytest.raises(RuntimeError), store.transaction():
        store.add_user("ivy", None, None)
        raise RuntimeError("boom")
    with store.transaction():
        assert store.get_user_by_name("ivy") is None


def test_store_refuses_work_outside_a_transaction(store):
    with pytest.raises(RuntimeError, match="outside a transaction"):
        store.get_user(1)


def test_a_new_sqlite_database_and_its_journal_are_readable_by_their_owner_alone(tmp_path):
    """They hold password hashes and e-mail addresses, as the key file holds the key (0600)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'bb.db'}")
    migrations.upgrade(engine)
    store = SqlStore(engine, Keyring(b"k" * 32), RecentReads(1.0))
    with store.transaction():
        store.add_user("alice", "alice@example.org", None)
    files = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "var").iterdir()}
    assert set(files) >= {"bb.db", "bb.db-wal", "bb.db-shm"}
    assert set(files.values()) == {0o600}, files
    engine.dispose()


def test_an_older_database_with_wider_modes_is_narrowed(tmp_path):
    path = tmp_path / "bb.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    make_engine(f"sqlite:///{path}").dispose()
    assert path.stat().st_mode & 0o777 == 0o600


def test_names_and_addresses_are_unique_whatever_their_case_and_across_each_other(store):
    with store.transaction():
        store.add_user("alice", "Alice@Example.org", None)
        for username, email, message in (
            ("Alice", None, "exists already"),
            ("mallory", "ALICE@example.org", "taken by user 'alice'"),
            ("alice@example.org", None, "taken by user 'alice'"),   # a name that is alice's address
            ("bob", "ALICE", "taken by user 'alice'"),               # an address that is alice's name
            ("", None, "empty"), ("a b", None, "spaces"), ("tab\there", None, "spaces"), ("x\x00", None, "control"),
            ("carol", "c arol@example.org", "spaces"),
        ):
            with pytest.raises(StoreError, match=message):
                store.add_user(username, email, None)
        store.add_user("bob", "bob@example.org", None)  # a refusal changed nothing
        assert [u.username for u in store.list_users()] == ["alice", "bob"]


def test_a_user_is_found_by_name_whatever_its_case(store):
    with store.transaction():
        alice = store.add_user("Alice", None, "hash")
        assert store.password_hash("ALICE") == (alice, "hash")
        assert store.get_user_by_name("alice").id == alice.id
        store.set_password("aLiCe", "other")
        assert store.password_hash("alice")[1] == "other"


def test_sessions_end_at_logout_password_change_disable_and_expiry(store):
    with store.transaction():
        alice = store.add_user("alice", None, "hash")
        first, second = store.start_session(alice.id, 3600), store.start_session(alice.id, 3600)
        assert store.session(first).user == alice and store.session("not-a-session") is None
        store.end_session(first)
        assert store.session(first) is None and store.session(second).user == alice
        assert store.set_password("alice", "new hash") == 1
        assert store.session(second) is None
        expired = store.start_session(alice.id, -1)
        assert store.session(expired) is None and store.purge_expired() == 1
        live = store.start_session(alice.id, 3600)
        make_client(store)
        store.save_token("access", "refresh", "app", alice.id, "imap", 3600, 86400)
        assert store.set_disabled("alice", True) == (1, 1)
        assert store.session(live) is None
        store.set_disabled("alice", False)
        assert store.find_access_token("access").revoked  # enabling brings no token back


def test_disabling_revokes_app_passwords_too(store):
    with store.transaction():
        alice = store.add_user("alice", None, "hash")
        _, secret = store.create_app_password(alice.id, "Printer", ["smtp"], None)
        store.set_disabled("alice", True)
        store.set_disabled("alice", False)
        assert store.find_app_password(store.keyring.digest(secret)).revoked  # enabling brings none back


def test_revoking_a_grant_ends_what_would_become_its_tokens(store):
    with store.transaction():
        alice, bob = store.add_user("alice", None, "hash"), store.add_user("bob", None, "hash")
        make_client(store)
        for user, code in ((alice, "alice-code"), (alice, "used-code"), (bob, "bob-code")):
            store.save_code(code, "app", user.id, "https://app.example/cb", "imap", None, None, int(time.time()) + 60)
        assert store.use_code(store.find_code("used-code").code_digest)
        store.save_device_code("device", "WDJB-MJHT", "app", "imap", int(time.time()) + 600, 5)
        store.decide_device_code("WDJB-MJHT", SignIn(alice, int(time.time()), ("pwd",)), True)
        store.revoke_grant(alice.id, "app")
        assert store.find_code("alice-code") is None
        assert store.find_code("used-code").used  # kept: its replay is still caught
        assert store.find_code("bob-code") is not None
        assert store.find_device_code("device").approved is False


def test_a_refresh_token_keeps_its_own_scope_when_the_access_token_has_less(store):
    with store.transaction():
        alice = store.add_user("alice", None, None)
        make_client(store)
        store.save_token("a1", "r1", "app", alice.id, "imap", 3600, 86400, refresh_scope="imap smtp")
        assert store.find_access_token("a1").scope == "imap"
        assert store.find_refresh_token("r1").scope == "imap smtp"
        store.save_token("a2", "r2", "app", alice.id, "imap", 3600, 86400, refresh_scope="imap")
        assert store.find_refresh_token("r2").scope == "imap"


def test_a_refresh_racing_a_revocation_leaves_no_token_of_the_family_alive(store, engine):
    """A refresh rotates the token and saves its successor while, on another connection, the
    family is revoked: the successor is revoked too, in either order. (On SQLite, writers take
    turns; on PostgreSQL the revocation waits for the refresh's row lock.)"""
    with store.transaction():
        alice = store.add_user("alice", None, None)
        make_client(store)
        store.save_token("a1", "r1", "app", alice.id, "imap", 3600, 86400)
        old = store.find_refresh_token("r1")
    refreshed, revoking_started = threading.Event(), threading.Event()

    def refresh() -> None:
        with store.transaction():
            assert store.mark_rotated(old.id)
            refreshed.set()
            revoking_started.wait(5)
            time.sleep(0.3)  # the revocation is now waiting on the row (PostgreSQL) or the file (SQLite)
            store.save_token("a2", "r2", "app", alice.id, "imap", 3600, 86400, family=old.family)

    def revoke() -> None:
        refreshed.wait(5)
        other = SqlStore(engine, Keyring(b"k" * 32), RecentReads(1.0))  # another process's store
        revoking_started.set()
        with other.transaction():
            other.revoke_family(old.family)

    threads = [threading.Thread(target=refresh), threading.Thread(target=revoke)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    with store.transaction():
        assert store.find_access_token("a2").revoked and store.find_access_token("a1").revoked


def test_a_revoked_token_cannot_be_rotated(store):
    with store.transaction():
        alice = store.add_user("alice", None, None)
        make_client(store)
        store.save_token("a1", "r1", "app", alice.id, "imap", 3600, 86400)
        token = store.find_refresh_token("r1")
        store.revoke_family(token.family)
        assert not store.mark_rotated(token.id)

"""`SqlStore`, the one blocking SQLAlchemy Core store over the tables of `schema`.

Every method runs inside `transaction()`, which binds one connection to the calling
thread: a web request makes one hop to the pool and does all its queries in one
transaction on a connection the thread keeps (a held connection costs ~17 µs a
query against ~70 µs with a pool checkout each time). Secrets arrive in clear and
are stored only as keyed digests (`crypto.Keyring.digest`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row, make_url

from bearerbridge.crypto import Keyring, new_app_password, new_secret
from bearerbridge.keys import KeySealer, SigningKey
from bearerbridge.passkeys import NewPasskey, StoredPasskey
from bearerbridge.storage import account, admin, passkeys, signing, strikes, twofactor, uses
from bearerbridge.storage import apppasswords as apps
from bearerbridge.storage.models import AuthCode, Client, DeviceCode, SignIn, Token, User
from bearerbridge.storage.recent import RecentReads
from bearerbridge.storage.schema import (
    CLIENT_BY_ID,
    CODE_BY_DIGEST,
    INSERT_CODE,
    INSERT_TOKEN,
    MARK_ROTATED,
    TOKEN_BY_ACCESS,
    TOKEN_BY_REFRESH,
    TOKENS_BY_ACCESS,
    USE_CODE,
    USER_BY_ID,
    auth_codes,
    clients,
    consents,
    device_codes,
    sessions,
    tokens,
    users,
)
from bearerbridge.throttle import Failed, Key, ThrottleRules

# Whitespace anywhere, and control characters: a name or address holds neither.
_UNPRINTABLE = re.compile(r"[\s\x00-\x1f\x7f]")


class StoreError(Exception):
    """A request the store refuses (a duplicate name, an unknown user)."""


def _private_sqlite_file(path: Path) -> None:
    """Create the database file readable by its owner alone, as the secret key is: it holds
    password hashes and e-mail addresses. SQLite gives its -wal and -shm files the database
    file's mode. A file made by an earlier version, with wider modes, is narrowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(OSError):  # gone meanwhile, or another user's: leave it as it is
                mode = existing.stat().st_mode
                if mode & 0o077:
                    existing.chmod(mode & 0o700)


def make_engine(url: str, threads: int = 4, deadline: float = 5.0, *, transactional_ddl: bool = False) -> Engine:
    """An engine for `url`; SQLite gets WAL, enforced foreign keys, and waits for its write lock
    at most `deadline` seconds, as PostgreSQL does to connect and for a statement.

    `transactional_ddl` (for migrations) makes SQLite's transactions begin where SQLAlchemy's do,
    so that CREATE and ALTER roll back with the rest: Python's sqlite3 otherwise runs DDL outside
    any transaction, and a migration that refuses halfway would leave half its tables behind
    (SQLAlchemy's documented recipe; PostgreSQL needs none)."""
    parsed = make_url(url)
    # Each pool thread keeps a connection; two more for the CLI and migrations.
    options: dict[str, Any] = {"pool_size": threads + 2, "max_overflow": 0, "pool_pre_ping": False}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database))
    else:
        options["pool_pre_ping"] = True
    if parsed.get_backend_name() == "postgresql":
        # psycopg's own options (a search_path, say) are kept; the timeout joins them.
        timeout = f"-c statement_timeout={int(deadline * 1000)}"
        server_options = " ".join(filter(None, [str(parsed.query.get("options") or ""), timeout]))
        parsed = parsed.difference_update_query(["options"])
        options["connect_args"] = {"connect_timeout": max(1, round(deadline)), "options": server_options}
    engine = sa.create_engine(parsed, **options)
    if parsed.get_backend_name() == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against crashes of the process and never corrupts in
            # WAL mode; only a power cut may lose the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(deadline * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            if transactional_ddl:
                dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own ...

        if transactional_ddl:
            @sa.event.listens_for(engine, "begin")
            def _sqlite_begin(connection: Connection) -> None:
                connection.exec_driver_sql("BEGIN")  # ... so the transaction starts here
    return engine


def _now() -> int:
    return int(time.time())


class SqlStore:
    """The one place that speaks SQL. Blocking: call it from the pool, inside `transaction()`."""

    def __init__(self, engine: Engine, keyring: Keyring, recent: RecentReads) -> None:
        self.engine = engine
        self.keyring = keyring
        # Where the clients and access tokens read are noted, for the paths that answer from
        # memory; told after every commit that takes validity from tokens.
        self.recent = recent
        self.sealer = KeySealer(keyring.sealing_key)
        self._local = threading.local()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed store calls in one transaction on this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._local.conn = self.engine.connect()
        self._local.invalidates = False
        try:
            with conn.begin():
                self._local.active = conn
                yield
            if self._local.invalidates:
                self.recent.invalidate()
        except sa.exc.DBAPIError:
            # The connection may be broken (database restarted); take a fresh one next time.
            self._local.conn = None
            conn.close()
            raise
        finally:
            self._local.active = None

    def _invalidates(self) -> None:
        """Note that this transaction takes validity from tokens: on commit, `recent` forgets."""
        self._local.invalidates = True

    @property
    def _db(self) -> Connection:
        conn = getattr(self._local, "active", None)
        if conn is None:
            raise RuntimeError("store used outside a transaction")
        return conn

    def check_writable(self) -> None:
        """A write that changes nothing: it waits for SQLite's write lock as any write would,
        and fails on a PostgreSQL that takes no writes."""
        self._db.execute(sessions.delete().where(sessions.c.expires_at < 0))

    # -- users --------------------------------------------------------------------------

    def add_user(self, username: str, email: str | None, password_hash: str | None,
                 display_name: str | None = None, is_admin: bool = False) -> User:
        """A new user. Names and addresses are compared case-folded, across each other too: no
        one's user name may be another's e-mail address, as either can name a user at login."""
        for what, value in (("user name", username), ("e-mail address", email)):
            if value is not None and (not value or _UNPRINTABLE.search(value)):
                raise StoreError(f"{what} {value!r}: empty, or with spaces or control characters")
        keys = [username.casefold()] + ([email.casefold()] if email else [])
        taken = self._db.execute(sa.select(users.c.username).where(
            sa.or_(users.c.username_key.in_(keys), users.c.email_key.in_(keys)))).scalars().first()
        if taken is not None:
            raise StoreError(f"user {username!r}: the name or address is taken by user {taken!r}"
                             if taken.casefold() != username.casefold() else f"user {username!r} exists already")
        try:
            result = self._db.execute(users.insert().values(
                username=username, email=email, password_hash=password_hash, disabled=False, created_at=_now(),
                username_key=keys[0], email_key=email.casefold() if email else None, display_name=display_name,
                is_admin=is_admin))
        except sa.exc.IntegrityError:  # another process added the name or address meanwhile
            raise StoreError(f"user {username!r}: the name or address is taken") from None
        user_id = result.inserted_primary_key[0]  # type: ignore[index]  # an insert always has one
        return User(user_id, username, email, display_name=display_name, is_admin=is_admin)

    @staticmethod
    def _user(row: Row[Any]) -> User:
        return User(row.id, row.username, row.email, row.disabled, row.display_name, row.is_admin)

    def get_user(self, user_id: int) -> User | None:
        row = self._db.execute(USER_BY_ID, {"user_id": user_id}).first()
        return None if row is None else self._user(row)

    def get_user_by_name(self, username: str) -> User | None:
        return self.password_hash(username)[0]

    def password_hash(self, username: str) -> tuple[User | None, str | None]:
        """The user of that name, whatever its case, and the password hash."""
        row = self._db.execute(users.select().where(users.c.username_key == username.casefold())).first()
        return (None, None) if row is None else (self._user(row), row.password_hash)

    def set_password(self, username: str, password_hash: str) -> int:
        """Set the password and end the user's browser sessions; how many ended."""
        return self.end_sessions(self._update_user(username, password_hash=password_hash))

    def set_disabled(self, username: str, disabled: bool) -> tuple[int, int]:
        """Disable (or enable) a user. Disabling ends the user's sessions and revokes every token
        and app password, so that enabling the user again brings none of them back: (sessions,
        tokens)."""
        user_id = self._update_user(username, disabled=disabled)
        if not disabled:
            return 0, 0
        apps.revoke_all(self._db, user_id)
        return self.end_sessions(user_id), self.revoke_for_user(user_id)

    def _update_user(self, username: str, **values: Any) -> int:
        """Update the user of that name (whatever its case); its id."""
        self._invalidates()
        user_id = self._db.execute(users.update().where(users.c.username_key == username.casefold())
                                   .values(**values).returning(users.c.id)).scalar()
        if user_id is None:
            raise StoreError(f"no user {username!r}")
        return int(user_id)

    def list_users(self) -> list[User]:
        return [self._user(row) for row in self._db.execute(users.select().order_by(users.c.username))]

    # -- clients ------------------------------------------------------------------------

    def add_client(self, client: Client, secret: str | None) -> None:
        self._db.execute(clients.insert().values(
            client_id=client.client_id, name=client.name,
            secret_digest=self.keyring.digest(secret) if secret else None,
            redirect_uris="\n".join(client.redirect_uris), scope=client.scope,
            grant_types=" ".join(client.grant_types), public=client.public, created_at=_now(),
            resource_server=client.resource_server, pkce_required=client.pkce_required,
            id_token_alg=client.id_token_alg, post_logout_redirect_uris="\n".join(client.post_logout_redirect_uris),
            website=client.website, logo_uri=client.logo_uri, access_token_format=client.access_token_format))

    def _client(self, row: Row[Any]) -> Client:
        return Client(resource_server=row.resource_server, pkce_required=row.pkce_required,
            client_id=row.client_id, name=row.name,
            redirect_uris=tuple(u for u in row.redirect_uris.split("\n") if u),
            scope=row.scope, grant_types=tuple(row.grant_types.split()), public=row.public,
            secret_digest=row.secret_digest, created_at=row.created_at, digest=self.keyring.digest,
            id_token_alg=row.id_token_alg, website=row.website, logo_uri=row.logo_uri,
            access_token_format=row.access_token_format,
            post_logout_redirect_uris=tuple(u for u in row.post_logout_redirect_uris.split("\n") if u))

    def get_client(self, client_id: str) -> Client | None:
        generation = self.recent.generation
        row = self._db.execute(CLIENT_BY_ID, {"client_id": client_id}).first()
        if row is None:
            return None
        client = self._client(row)
        self.recent.remember_client(client, generation)
        return client

    def find_client(self, client_id: str) -> Client | None:
        """A client read within `recent`'s ttl (and generation), else from the database: every
        token request looks its client up, and clients change rarely."""
        return self.recent.client(client_id) or self.get_client(client_id)

    def list_clients(self) -> list[Client]:
        return [self._client(row) for row in self._db.execute(clients.select().order_by(clients.c.name))]

    def update_client(self, client_id: str, resource_server: bool | None = None,
                      pkce_required: bool | None = None) -> bool:
        """Change what is given (not None) of a client's settings; False if there is no such client."""
        values = {name: value for name, value in (("resource_server", resource_server),
                                                  ("pkce_required", pkce_required)) if value is not None}
        if not values:
            return self.get_client(client_id) is not None
        self._invalidates()  # the client as remembered says otherwise
        return self._db.execute(clients.update().where(clients.c.client_id == client_id)
                                .values(**values)).rowcount > 0

    def delete_client(self, client_id: str) -> bool:
        """Delete a client with its codes, tokens and consents (cascading foreign keys)."""
        self._invalidates()
        return self._db.execute(clients.delete().where(clients.c.client_id == client_id)).rowcount > 0

    # -- authorization codes ------------------------------------------------------------

    def save_code(self, code: str, client_id: str, user_id: int, redirect_uri: str, scope: str,
                  code_challenge: str | None, code_challenge_method: str | None, expires_at: int,
                  nonce: str | None = None, sign_in: SignIn | None = None) -> None:
        self._db.execute(INSERT_CODE, {
            "code_digest": self.keyring.digest(code), "client_id": client_id, "user_id": user_id,
            "redirect_uri": redirect_uri, "scope": scope, "code_challenge": code_challenge,
            "code_challenge_method": code_challenge_method, "expires_at": expires_at, "used": False,
            "nonce": nonce, "auth_time": sign_in.auth_time if sign_in else None,
            "amr": " ".join(sign_in.amr) if sign_in else None})

    def nonce_in_use(self, client_id: str, nonce: str) -> bool:
        """Whether a code of this client still kept (unexpired, or used and kept to catch a replay)
        was asked for with this nonce: OpenID Connect's replay check."""
        return self._db.execute(sa.select(auth_codes.c.code_digest).where(
            auth_codes.c.client_id == client_id, auth_codes.c.nonce == nonce).limit(1)).first() is not None

    def find_code(self, code: str) -> AuthCode | None:
        row = self._db.execute(CODE_BY_DIGEST, {"digest": self.keyring.digest(code)}).first()
        return None if row is None else AuthCode(**row._mapping)

    def use_code(self, code_digest: str) -> bool:
        """Mark a code used; False if it already was (a concurrent exchange won the race)."""
        return self._db.execute(USE_CODE, {"digest": code_digest}).rowcount == 1

    # -- tokens -------------------------------------------------------------------------

    def save_token(self, access_token: str, refresh_token: str | None, client_id: str, user_id: int | None,
                   scope: str, expires_in: int, refresh_ttl: int | None, family: str | None = None,
                   code_digest: str | None = None, refresh_scope: str | None = None) -> int:
        """A token pair; `refresh_scope` when the refresh token's scope is not the access token's.
        Returns its row id (for the audit log; never the tokens)."""
        now = _now()
        result = self._db.execute(INSERT_TOKEN, {
            "access_digest": self.keyring.digest(access_token),
            "refresh_digest": self.keyring.digest(refresh_token) if refresh_token else None,
            "client_id": client_id, "user_id": user_id, "scope": scope, "issued_at": now,
            "expires_at": now + expires_in,
            "refresh_expires_at": now + refresh_ttl if refresh_token and refresh_ttl else None,
            "revoked": False, "rotated": False, "family": family or uuid.uuid4().hex, "code_digest": code_digest,
            "refresh_scope": refresh_scope if refresh_scope != scope else None})
        key = result.inserted_primary_key
        assert key is not None  # an INSERT of one row always has one
        return int(key[0])

    @staticmethod
    def _token(row: Row[Any]) -> Token:
        return Token(
            id=row.id, client_id=row.client_id, user_id=row.user_id, username=row.username,
            email=row.email, scope=row.scope, issued_at=row.issued_at, expires_at=row.expires_at,
            refresh_expires_at=row.refresh_expires_at, revoked=row.revoked, rotated=row.rotated,
            family=row.family, user_disabled=bool(row.user_disabled))

    def find_access_token(self, access_token: str) -> Token | None:
        generation, digest = self.recent.generation, self.keyring.digest(access_token)
        row = self._db.execute(TOKEN_BY_ACCESS, {"digest": digest}).first()
        if row is None:
            return None
        token = self._token(row)
        self.recent.remember_token(digest, token, generation)
        return token

    def find_access_tokens(self, digests: list[str]) -> dict[str, Token]:
        """Tokens by the digests of their access tokens, in one query (for batched validation)."""
        generation = self.recent.generation
        found = {row.access_digest: self._token(row)
                 for row in self._db.execute(TOKENS_BY_ACCESS, {"digests": digests})}
        for digest, token in found.items():
            self.recent.remember_token(digest, token, generation)
        return found

    def find_refresh_token(self, refresh_token: str) -> Token | None:
        """The token pair of a refresh token, with the refresh token's scope."""
        row = self._db.execute(TOKEN_BY_REFRESH, {"digest": self.keyring.digest(refresh_token)}).first()
        if row is None:
            return None
        token = self._token(row)
        return dataclasses.replace(token, scope=row.refresh_scope) if row.refresh_scope is not None else token

    def mark_rotated(self, token_id: int) -> bool:
        """Retire a refresh token after use; False if another request rotated it first."""
        return self._db.execute(MARK_ROTATED, {"token_id": token_id}).rowcount == 1

    def _revoke(self, condition: sa.ColumnElement[bool]) -> int:
        self._invalidates()
        revoke = tokens.update().where(condition, tokens.c.revoked.is_(False)).values(revoked=True)
        # Twice: on PostgreSQL each statement reads the rows committed when it starts. A refresh that
        # had rotated a token of this family when the first pass came to it held the row; the first
        # pass waited for it, and the new token the refresh then committed is seen by the second.
        return self._db.execute(revoke).rowcount + self._db.execute(revoke).rowcount

    def revoke_token(self, token_id: int) -> int:
        return self._revoke(tokens.c.id == token_id)

    def revoke_family(self, family: str) -> int:
        """Revoke every token rotated from one grant (refresh token reuse, RFC 9700 §4.14)."""
        return self._revoke(tokens.c.family == family)

    def revoke_from_code(self, code_digest: str) -> int:
        """Revoke the tokens issued for a code, and their rotations (code reuse, RFC 6749 §4.1.2)."""
        families = sa.select(tokens.c.family).where(tokens.c.code_digest == code_digest).scalar_subquery()
        return self._revoke(tokens.c.family.in_(families))

    def revoke_for_user(self, user_id: int) -> int:
        return self._revoke(tokens.c.user_id == user_id)

    def revoke_for_client(self, client_id: str) -> int:
        return self._revoke(tokens.c.client_id == client_id)

    def purge_expired(self) -> int:
        """Delete sessions, codes and tokens past every use, and the recorded uses of grants no
        token is left of; returns how many rows went."""
        now = _now()
        dead_device = device_codes.c.expires_at < now
        dead_code = auth_codes.c.expires_at < now
        dead_token = sa.and_(tokens.c.expires_at < now, sa.or_(
            tokens.c.refresh_expires_at.is_(None), tokens.c.refresh_expires_at < now))
        return (self._db.execute(sessions.delete().where(sessions.c.expires_at < now)).rowcount
                + self._db.execute(auth_codes.delete().where(dead_code)).rowcount
                + self._db.execute(device_codes.delete().where(dead_device)).rowcount
                + self._db.execute(tokens.delete().where(dead_token)).rowcount
                + strikes.purge(self._db, now) + signing.purge(self._db, now) + uses.purge(self._db))

    # -- when grants were last used (uses.py) ---------------------------------------------------

    def record_uses(self, batch: uses.Batch) -> int:
        """Note when and where grants were last used at services, keeping the later time of each
        (`storage.uses.record`); how many rows were written."""
        return uses.record(self._db, batch)

    # -- signing keys (keys.py) -----------------------------------------------------------------

    def ensure_signing_keys(self) -> list[SigningKey]:
        """Every signing key, a current and a next one for each algorithm made on first use."""
        return signing.ensure(self._db, self.sealer, _now())

    def rotate_signing_keys(self, lifetime: int, every: int | None = None) -> bool:
        """Retire the current keys (published `lifetime` seconds more) and promote the next ones;
        with `every`, only if the current keys are that many seconds old. Whether it rotated."""
        return signing.rotate(self._db, self.sealer, _now(), lifetime, every)

    # -- failed sign-ins (throttle.py) ----------------------------------------------------------

    def begin_attempts(self, keys: Sequence[Key], now: float, rules: ThrottleRules) -> float:
        """Count a sign-in attempt of each key before it is checked (0), or the seconds a blocked
        key must wait (nothing counted): `storage.strikes.begin_attempts`."""
        return strikes.begin_attempts(self._db, self.keyring.digest, keys, now, rules)

    def settle_attempts(self, keys: Sequence[Key], ok: bool, now: float, rules: ThrottleRules) -> Failed:
        """How the attempts begun came out: `storage.strikes.settle_attempts`."""
        return strikes.settle_attempts(self._db, self.keyring.digest, keys, ok, now, rules)

    # -- browser sessions -----------------------------------------------------------------------

    def start_session(self, user_id: int, ttl: int, amr: tuple[str, ...] = ("pwd",), address: str | None = None,
                      user_agent: str | None = None) -> str:
        """A new session of the user for `ttl` seconds, signed in by `amr` (RFC 8176) from
        `address` with `user_agent` (for the user's list of sessions): its id, for the cookie
        (256 random bits; only the digest is kept)."""
        session_id, now = new_secret(), _now()
        self._db.execute(sessions.insert().values(
            id_digest=self.keyring.digest(session_id), user_id=user_id, created_at=now, expires_at=now + ttl,
            amr=" ".join(amr), address=address, user_agent=user_agent[:255] if user_agent else None))
        return session_id

    def session(self, session_id: str) -> SignIn | None:
        """The sign-in of a session that has not ended or expired, by an enabled user."""
        row = self._db.execute(sa.select(users, sessions.c.created_at.label("auth_time"), sessions.c.amr)
                               .select_from(sessions.join(users)).where(
            sessions.c.id_digest == self.keyring.digest(session_id), sessions.c.expires_at > _now(),
            users.c.disabled.is_(False))).first()
        return None if row is None else SignIn(self._user(row), row.auth_time, tuple(row.amr.split()))

    def add_to_session(self, session_id: str, methods: Sequence[str]) -> None:
        """Note that this session has now also proven `methods` (RFC 8176), e.g. "otp" and "mfa"
        when its user set up two-factor sign-in with a code: what `[server] require_second_factor` asks."""
        digest = self.keyring.digest(session_id)
        amr = self._db.execute(sa.select(sessions.c.amr).where(sessions.c.id_digest == digest)).scalar()
        if amr is None:
            return
        proven = amr.split()
        proven += [method for method in methods if method not in proven]
        self._db.execute(sessions.update().where(sessions.c.id_digest == digest).values(amr=" ".join(proven)))

    def end_session(self, session_id: str) -> None:
        self._db.execute(sessions.delete().where(sessions.c.id_digest == self.keyring.digest(session_id)))

    def end_sessions(self, user_id: int) -> int:
        """End every session of a user; how many there were."""
        return self._db.execute(sessions.delete().where(sessions.c.user_id == user_id)).rowcount

    # -- the user's own page (storage/account.py) --------------------------------------------

    def connected_apps(self, user_id: int) -> list[account.ConnectedApp]:
        return account.connected_apps(self._db, user_id, _now())

    def revoke_grant(self, user_id: int, client_id: str) -> tuple[int, int]:
        """End a user's grant to a client: revoke every token of it and forget the consent, so the
        next authorization asks again; (tokens revoked, consents forgotten)."""
        revoked = self._revoke(sa.and_(tokens.c.user_id == user_id, tokens.c.client_id == client_id))
        # And what would become tokens: a code not yet exchanged (a used one stays, to catch its
        # replay), a device code approved but not yet polled for.
        self._db.execute(auth_codes.delete().where(auth_codes.c.user_id == user_id, auth_codes.c.client_id == client_id,
                                                   auth_codes.c.used.is_(False)))
        self._db.execute(device_codes.update().where(device_codes.c.user_id == user_id,
                                                     device_codes.c.client_id == client_id,
                                                     device_codes.c.used.is_(False)).values(approved=False))
        return revoked, account.revoke_grant(self._db, user_id, client_id)

    # -- app passwords (storage/apppasswords.py; web/app_passwords.py, sasl/validator.py) ----------

    def create_app_password(self, user_id: int, name: str, services: Sequence[str], expires_at: int | None
                            ) -> tuple[int, str]:
        """A new app password of the user for `services`: (its id, the secret, to be shown once;
        only its keyed digest is kept)."""
        secret = new_app_password()
        return apps.create(self._db, self.keyring.digest(secret), user_id, name, services, _now(),
                           expires_at), secret

    def find_app_password(self, digest: str) -> apps.AppPassword | None:
        """The app password with this digest, noted in `recent` for the SASL paths to answer from."""
        generation = self.recent.generation
        found = apps.find(self._db, digest)
        if found is not None:
            self.recent.remember_app_password(digest, found, generation)
        return found

    def app_passwords(self, user_id: int) -> list[apps.Listed]:
        return apps.listed(self._db, user_id, _now())

    def revoke_app_password(self, user_id: int, app_id: int) -> apps.AppPassword | None:
        """Revoke one of the user's app passwords (at once here, within `cache_ttl` elsewhere)."""
        self._invalidates()
        return apps.revoke(self._db, user_id, app_id)

    def first_app_uses(self, batch: uses.Batch) -> list[apps.FirstUse]:
        return apps.first_uses(self._db, batch)

    def browser_sessions(self, user_id: int) -> list[account.BrowserSession]:
        return account.browser_sessions(self._db, user_id, _now())

    def end_other_sessions(self, user_id: int, session_id: str | None) -> int:
        """End every session of the user but `session_id`'s (all, without one); how many ended."""
        return account.end_other_sessions(self._db, user_id, self.keyring.digest(session_id) if session_id else None)

    # -- administration (web/admin.py and cli.py; storage/admin.py) -----------------------------

    def has_users(self) -> bool:
        return admin.has_users(self._db)

    def set_admin(self, username: str, is_admin: bool) -> None:
        """Make the user of that name an admin (one who may use /admin), or no longer one."""
        self._update_user(username, is_admin=is_admin)

    def consent_counts(self) -> dict[str, int]:
        return admin.consent_counts(self._db)

    def second_factor_users(self) -> set[int]:
        return admin.second_factor_users(self._db) | passkeys.user_ids(self._db)

    def rotate_client_secret(self, client_id: str, secret: str) -> bool:
        """Give a confidential client a new secret; the old one stops working at once. False for no
        such client, or a public one (it has none)."""
        self._invalidates()  # the client as remembered holds the old secret's digest
        return admin.set_secret(self._db, client_id, self.keyring.digest(secret))

    # -- two-factor sign-in (storage/twofactor.py; web/second_factor.py, web/twofactor.py) --------

    def two_factor(self, user_id: int) -> twofactor.TwoFactor:
        return twofactor.state(self._db, user_id)

    def two_factor_enabled(self, user_id: int) -> bool:
        return twofactor.enabled(self._db, user_id)

    def begin_totp(self, user_id: int, secret: str) -> bool:
        """Keep a new TOTP secret, sealed, waiting for its first code; False if two-factor is on."""
        return twofactor.begin(self._db, self.sealer, user_id, secret)

    def waiting_totp_secret(self, user_id: int) -> str | None:
        return twofactor.waiting_secret(self._db, self.sealer, user_id)

    def confirm_totp(self, user_id: int, code: str, recovery: list[str]) -> bool:
        """Turn two-factor sign-in on if `code` is the waiting secret's current one, with `recovery`
        as the recovery codes (kept as digests)."""
        if not twofactor.confirm(self._db, self.sealer, user_id, code, time.time()):
            return False
        twofactor.replace_recovery_codes(self._db, self.keyring.digest, user_id, recovery)
        return True

    def use_totp_code(self, user_id: int, code: str) -> twofactor.CodeCheck:
        return twofactor.use_code(self._db, self.sealer, user_id, code, time.time())

    def use_recovery_code(self, user_id: int, code: str) -> twofactor.CodeCheck:
        return twofactor.use_recovery_code(self._db, self.keyring.digest, user_id, code, time.time())

    def replace_recovery_codes(self, user_id: int, codes: list[str]) -> None:
        twofactor.replace_recovery_codes(self._db, self.keyring.digest, user_id, codes)

    def disable_two_factor(self, user_id: int) -> bool:
        return twofactor.disable(self._db, user_id)

    # -- passkeys (storage/passkeys.py; web/passkeys.py, web/second_factor.py) ---------------------

    def passkeys(self, user_id: int) -> list[StoredPasskey]:
        return passkeys.of_user(self._db, user_id)

    def passkey(self, credential_id: str) -> StoredPasskey | None:
        return passkeys.find(self._db, credential_id)

    def passkey_handle(self, user_id: int) -> str | None:
        return passkeys.user_handle(self._db, user_id)

    def add_passkey(self, user_id: int, handle: str, new: NewPasskey, name: str) -> bool:
        return passkeys.add(self._db, user_id, handle, new, name, _now())

    def passkey_used(self, credential_id: str, sign_count: int) -> bool:
        return passkeys.used(self._db, credential_id, sign_count, _now())

    def rename_passkey(self, user_id: int, credential_id: str, name: str) -> bool:
        return passkeys.rename(self._db, user_id, credential_id, name)

    def remove_passkeys(self, user_id: int, credential_ids: list[str] | None = None) -> int:
        return passkeys.remove(self._db, user_id, credential_ids)

    def reset_second_factor(self, user_id: int) -> bool:
        """An admin's reset: TOTP off and every passkey forgotten; False if the user had neither."""
        totp = twofactor.disable(self._db, user_id)
        return passkeys.remove(self._db, user_id) > 0 or totp

    def second_factors(self, user_id: int) -> tuple[bool, list[StoredPasskey]]:
        """What a sign-in of the user asks after the password: a TOTP code (whether it is on), a passkey."""
        return twofactor.enabled(self._db, user_id), passkeys.of_user(self._db, user_id)

    # -- device codes (RFC 8628) --------------------------------------------------------------

    def save_device_code(self, device_code: str, user_code: str, client_id: str, scope: str, expires_at: int,
                         interval: int) -> None:
        self._db.execute(device_codes.insert().values(
            device_digest=self.keyring.digest(device_code), user_code=user_code, client_id=client_id, scope=scope,
            expires_at=expires_at, interval=interval, last_poll_at=None, user_id=None, approved=None, used=False))

    def _device(self, condition: sa.ColumnElement[bool]) -> DeviceCode | None:
        row = self._db.execute(device_codes.select().where(condition)).first()
        return None if row is None else DeviceCode(**row._mapping)

    def waiting_device_codes(self, client_id: str) -> int:
        """How many of a client's device codes are unexpired and not yet answered by a user."""
        return self._db.execute(sa.select(sa.func.count()).select_from(device_codes).where(
            device_codes.c.client_id == client_id, device_codes.c.expires_at > _now(),
            device_codes.c.approved.is_(None))).scalar_one()

    def find_device_code(self, device_code: str) -> DeviceCode | None:
        return self._device(device_codes.c.device_digest == self.keyring.digest(device_code))

    def find_user_code(self, user_code: str) -> DeviceCode | None:
        return self._device(device_codes.c.user_code == user_code)

    def decide_device_code(self, user_code: str, sign_in: SignIn, approved: bool) -> bool:
        """Record the answer of the user signed in once; False if it was already given."""
        return self._db.execute(device_codes.update().where(
            device_codes.c.user_code == user_code, device_codes.c.approved.is_(None))
            .values(user_id=sign_in.user.id, approved=approved, auth_time=sign_in.auth_time,
                    amr=" ".join(sign_in.amr))).rowcount == 1

    def note_device_poll(self, device_digest: str, now: float) -> float | None:
        """Record a poll; returns the time of the one before."""
        previous = self._db.execute(sa.select(device_codes.c.last_poll_at).where(
            device_codes.c.device_digest == device_digest)).scalar()
        self._db.execute(device_codes.update().where(device_codes.c.device_digest == device_digest)
                         .values(last_poll_at=now))
        return previous

    def use_device_code(self, device_digest: str) -> bool:
        """Consume an approved device code; False if tokens were already issued for it."""
        return self._db.execute(device_codes.update().where(
            device_codes.c.device_digest == device_digest, device_codes.c.used.is_(False))
            .values(used=True)).rowcount == 1

    # -- consents -----------------------------------------------------------------------

    def consented_scope(self, user_id: int, client_id: str) -> set[str]:
        scope = self._db.execute(sa.select(consents.c.scope).where(
            consents.c.user_id == user_id, consents.c.client_id == client_id)).scalar()
        return set(scope.split()) if scope else set()

    def save_consent(self, user_id: int, client_id: str, scope: set[str]) -> None:
        """Remember the union of what the user has granted this client."""
        granted = self.consented_scope(user_id, client_id) | scope
        values = {"scope": " ".join(sorted(granted)), "updated_at": _now()}
        updated = self._db.execute(consents.update().where(
            consents.c.user_id == user_id, consents.c.client_id == client_id).values(**values)).rowcount
        if not updated:
            self._db.execute(consents.insert().values(user_id=user_id, client_id=client_id, **values))

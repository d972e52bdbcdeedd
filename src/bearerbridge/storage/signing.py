"""Signing keys in the database (`signing_keys`), with keys.py's rules: made on first use,
rotated, forgotten when they expire. Each change locks the table first (PostgreSQL; SQLite lets
one writer in at a time), so that instances starting at once make one set of keys, not two."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge import keys
from bearerbridge.keys import KeySealer, SigningKey, Stage
from bearerbridge.storage.schema import signing_keys


def _lock(db: Connection) -> None:
    if db.dialect.name == "postgresql":
        db.exec_driver_sql("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
    else:  # take SQLite's write lock now, before reading what to change
        db.execute(signing_keys.delete().where(sa.false()))


def read(db: Connection) -> list[SigningKey]:
    return [SigningKey(row.kid, row.alg, Stage(row.stage), row.sealed, row.since, row.expires_at)
            for row in db.execute(sa.select(signing_keys))]


def _store(db: Connection, added: tuple[SigningKey, ...] | list[SigningKey],
           changed: tuple[SigningKey, ...] = ()) -> None:
    if added:
        db.execute(signing_keys.insert(), [
            {"kid": k.kid, "alg": k.alg, "stage": k.stage, "sealed": k.sealed, "since": k.since,
             "expires_at": k.expires_at} for k in added])
    for k in changed:
        db.execute(signing_keys.update().where(signing_keys.c.kid == k.kid).values(
            stage=k.stage, since=k.since, expires_at=k.expires_at))


def ensure(db: Connection, sealer: KeySealer, now: int) -> list[SigningKey]:
    """The keys, with a current and a next one for each algorithm made if missing (first start)."""
    found = read(db)
    if keys.missing(found, sealer, now):
        _lock(db)
        found = read(db)  # another instance may have made them meanwhile
        made = keys.missing(found, sealer, now)
        _store(db, made)
        found += made
    return found


def rotate(db: Connection, sealer: KeySealer, now: int, lifetime: int, every: int | None = None) -> bool:
    """Rotate every algorithm's keys (`keys.rotation`), or with `every` only if the current keys
    are that old: decided under the lock, so that instances checking at once rotate once."""
    _lock(db)
    found = read(db)
    if every is not None and not keys.due(found, now, every):
        return False
    change = keys.rotation(found, sealer, now, lifetime)
    _store(db, change.added, change.changed)
    return True


def purge(db: Connection, now: int) -> int:
    """Forget retired keys whose tokens have all expired."""
    return db.execute(signing_keys.delete().where(signing_keys.c.stage == Stage.RETIRED,
                                                  signing_keys.c.expires_at < now)).rowcount

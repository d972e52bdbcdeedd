"""Passkeys at rest (`passkeys`): WebAuthn credentials, each with its public key and signature
counter. Functions of a Connection, called through `SqlStore`.

A user's passkeys share one user handle, random (passkeys.new_user_handle), made with the first
one; it is what an authenticator gives back at a sign-in without a name, and never the name.
The counter only moves forward, in one conditional UPDATE: of two answers checked at once
against the same stored count (two instances), one is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge.passkeys import MAX_PASSKEYS, NewPasskey, StoredPasskey
from bearerbridge.storage.schema import passkeys


def of_user(db: Connection, user_id: int) -> list[StoredPasskey]:
    """The user's passkeys, oldest first."""
    rows = db.execute(passkeys.select().where(passkeys.c.user_id == user_id)
                      .order_by(passkeys.c.created_at, passkeys.c.credential_id))
    return [_passkey(row) for row in rows]


def _passkey(row: sa.Row) -> StoredPasskey:
    return StoredPasskey(**{**row._mapping, "transports": row.transports or ""})


def find(db: Connection, credential_id: str) -> StoredPasskey | None:
    row = db.execute(passkeys.select().where(passkeys.c.credential_id == credential_id)).first()
    return None if row is None else _passkey(row)


def user_ids(db: Connection) -> set[int]:
    """The ids of the users who have a passkey."""
    return set(db.execute(sa.select(passkeys.c.user_id).distinct()).scalars())


def user_handle(db: Connection, user_id: int) -> str | None:
    """The handle the user's passkeys share, if they have one."""
    return db.execute(sa.select(passkeys.c.user_handle).where(passkeys.c.user_id == user_id).limit(1)).scalar()


def add(db: Connection, user_id: int, handle: str, new: NewPasskey, name: str, now: int) -> bool:
    """Keep a new passkey; False (nothing kept) when its id is known already, or the user has
    MAX_PASSKEYS. `handle` must be the user's (user_handle) when they have one."""
    count = db.execute(sa.select(sa.func.count()).select_from(passkeys).where(passkeys.c.user_id == user_id))
    if count.scalar_one() >= MAX_PASSKEYS or find(db, new.credential_id) is not None:
        return False
    db.execute(passkeys.insert().values(
        credential_id=new.credential_id, user_id=user_id, user_handle=handle, public_key=new.public_key,
        sign_count=new.sign_count, transports=new.transports or None, name=name, created_at=now, last_used_at=None))
    return True


def used(db: Connection, credential_id: str, sign_count: int, now: int) -> bool:
    """Note a sign-in with the passkey and its new counter; False when the stored counter has
    moved to or past it meanwhile (an authenticator that counts, answering twice). A counter of
    0 is an authenticator that does not count (WebAuthn §6.1.1): it stays 0."""
    forward = passkeys.c.sign_count < sign_count if sign_count else passkeys.c.sign_count == 0
    return db.execute(passkeys.update().where(passkeys.c.credential_id == credential_id, forward)
                      .values(sign_count=sign_count, last_used_at=now)).rowcount == 1


def rename(db: Connection, user_id: int, credential_id: str, name: str) -> bool:
    return db.execute(passkeys.update().where(passkeys.c.user_id == user_id, passkeys.c.credential_id == credential_id)
                      .values(name=name)).rowcount == 1


def remove(db: Connection, user_id: int, credential_ids: Sequence[str] | None = None) -> int:
    """Forget the user's passkeys named (all of them when None); how many were forgotten."""
    condition = passkeys.c.user_id == user_id
    if credential_ids is not None:
        condition = sa.and_(condition, passkeys.c.credential_id.in_(list(credential_ids)))
    return db.execute(passkeys.delete().where(condition)).rowcount

"""App passwords at rest (`app_passwords`, issue 12): a password a user makes on /account for a
client that only knows passwords, good for the services they picked until it expires or they
revoke it. Functions of a Connection, called through `SqlStore`.

Only the keyed digest of the secret is kept (`Keyring.digest`): the secret is 256 random bits
(`crypto.new_secret`), so no slow hash is needed, and a login costs the digest and one lookup
by the unique index. Its uses are recorded as a grant's are (`token_uses`, written behind by
`bearerbridge.uses`), under the family `app:<id>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge.storage.account import Use
from bearerbridge.storage.schema import app_passwords, token_uses, users

FAMILY_PREFIX = "app:"


def family_of(app_id: int) -> str:
    """The family an app password's uses are recorded under in `token_uses`."""
    return f"{FAMILY_PREFIX}{app_id}"


@dataclass(frozen=True, slots=True)
class AppPassword:
    """An app password joined with the state of its user, as a login judges it."""

    id: int
    user_id: int
    username: str
    email: str | None
    name: str
    services: frozenset[str]
    created_at: int
    expires_at: int | None  # None: until revoked
    revoked: bool
    user_disabled: bool = False

    @property
    def family(self) -> str:
        return family_of(self.id)

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass
class Listed:
    """An app password as the user's page lists it, with its last use at each service."""

    password: AppPassword
    uses: dict[str, Use] = field(default_factory=dict)


def _select() -> sa.Select[Any]:
    return sa.select(app_passwords, users.c.username, users.c.email, users.c.disabled.label("user_disabled")
                     ).select_from(app_passwords.join(users))


def _record(row: Any) -> AppPassword:
    return AppPassword(row.id, row.user_id, row.username, row.email, row.name, frozenset(row.services.split()),
                       row.created_at, row.expires_at, row.revoked, row.user_disabled)


def create(db: Connection, digest: str, user_id: int, name: str, services: Iterable[str], now: int,
           expires_at: int | None) -> int:
    """Keep a new app password by the digest of its secret; its row id."""
    result = db.execute(app_passwords.insert().values(
        user_id=user_id, name=name, digest=digest, services=" ".join(sorted(set(services))), created_at=now,
        expires_at=expires_at, revoked=False))
    key = result.inserted_primary_key
    assert key is not None  # an INSERT of one row
    return int(key[0])


def find(db: Connection, digest: str) -> AppPassword | None:
    """The app password with this digest (the unique index), revoked or expired ones too."""
    row = db.execute(_select().where(app_passwords.c.digest == digest)).first()
    return None if row is None else _record(row)


def listed(db: Connection, user_id: int, now: int) -> list[Listed]:
    """The user's app passwords neither revoked nor expired, newest first, with their last uses."""
    live = sa.or_(app_passwords.c.expires_at.is_(None), app_passwords.c.expires_at > now)
    found = {row.id: Listed(_record(row)) for row in db.execute(
        _select().where(app_passwords.c.user_id == user_id, app_passwords.c.revoked.is_(False), live)
        .order_by(app_passwords.c.created_at.desc(), app_passwords.c.id.desc()))}
    if found:
        by_family = {item.password.family: item for item in found.values()}
        for use in db.execute(token_uses.select().where(token_uses.c.family.in_(list(by_family)))):
            by_family[use.family].uses[use.service] = Use(use.service, use.last_used_at, use.address)
    return list(found.values())


def revoke(db: Connection, user_id: int, app_id: int) -> AppPassword | None:
    """Revoke one of the user's app passwords; the record as it was, or None if there was none
    of theirs left to revoke."""
    row = db.execute(_select().where(app_passwords.c.id == app_id, app_passwords.c.user_id == user_id,
                                     app_passwords.c.revoked.is_(False))).first()
    if row is None:
        return None
    db.execute(app_passwords.update().where(app_passwords.c.id == app_id).values(revoked=True))
    return _record(row)


def revoke_all(db: Connection, user_id: int) -> int:
    """Revoke every app password of the user (when the user is disabled); how many."""
    return db.execute(app_passwords.update().where(app_passwords.c.user_id == user_id,
                                                   app_passwords.c.revoked.is_(False)).values(revoked=True)).rowcount


@dataclass(frozen=True)
class FirstUse:
    """An app password used for the first time: where, and by whom (for the audit log)."""

    password: AppPassword
    services: tuple[str, ...]
    address: str | None


def first_uses(db: Connection, batch: Any) -> list[FirstUse]:
    """The app passwords of a batch of uses (`storage.uses.Batch`) with no use recorded yet: read
    before the batch is written, so each is reported once per database (two instances writing
    the first use of the same one in the same instant may both report it)."""
    families: dict[str, list[tuple[str, float, str | None]]] = {}
    for (family, service), (at, address) in batch.items():
        if family.startswith(FAMILY_PREFIX):
            families.setdefault(family, []).append((service, at, address))
    if not families:
        return []
    seen = set(db.execute(sa.select(token_uses.c.family).where(token_uses.c.family.in_(list(families)))).scalars())
    ids = [int(f.removeprefix(FAMILY_PREFIX)) for f in families if f not in seen
           and f.removeprefix(FAMILY_PREFIX).isdigit()]
    if not ids:
        return []
    found = []
    for row in db.execute(_select().where(app_passwords.c.id.in_(ids)).order_by(app_passwords.c.id)):
        password = _record(row)
        uses = sorted(families[password.family], key=lambda use: use[1])
        found.append(FirstUse(password, tuple(sorted({service for service, _, _ in uses})), uses[0][2]))
    return found


def orphan_uses() -> sa.ColumnElement[bool]:
    """The condition on `token_uses` rows of app passwords that no longer exist."""
    live = sa.exists().where(token_uses.c.family == sa.literal(FAMILY_PREFIX) + sa.cast(app_passwords.c.id, sa.String))
    return sa.and_(token_uses.c.family.startswith(FAMILY_PREFIX), ~live)

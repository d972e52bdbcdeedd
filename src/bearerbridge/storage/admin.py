"""What /admin and the command line read and change beyond the users and clients themselves: how
many users granted each client, who has a second factor, and a client's new secret. Functions of
a Connection, called through `SqlStore`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge.storage.schema import clients, consents, totp_secrets, users


def has_users(db: Connection) -> bool:
    """Whether any user exists (the command line makes the first one an admin)."""
    return db.execute(sa.select(users.c.id).limit(1)).first() is not None


def consent_counts(db: Connection) -> dict[str, int]:
    """How many users granted each client access (their remembered consents), by client id."""
    return {client_id: count for client_id, count in db.execute(
        sa.select(consents.c.client_id, sa.func.count()).group_by(consents.c.client_id))}


def second_factor_users(db: Connection) -> set[int]:
    """The ids of the users who have a confirmed second factor (TOTP)."""
    return set(db.execute(sa.select(totp_secrets.c.user_id).where(totp_secrets.c.confirmed_at.is_not(None)))
               .scalars())


def set_secret(db: Connection, client_id: str, secret_digest: str) -> bool:
    """Replace a confidential client's secret (its digest); False for no such client, or a public one."""
    return db.execute(clients.update().where(clients.c.client_id == client_id, clients.c.public.is_(False))
                      .values(secret_digest=secret_digest)).rowcount > 0


"""What the user's own page (/account) reads: the apps they connected, with when each grant was
last used at each service (`token_uses`, written behind by the services), and their browser
sessions. Functions of a Connection, called through `SqlStore`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge.storage.schema import clients, consents, sessions, token_uses, tokens


@dataclass(frozen=True)
class Use:
    """The last use of a grant (or of an app password) at one service."""

    service: str
    at: int
    address: str | None


@dataclass
class ConnectedApp:
    """A client the user granted access: what it may do, since when, and where it was used last."""

    client_id: str
    name: str
    website: str | None
    scope: set[str] = field(default_factory=set)
    granted_at: int = 0
    uses: dict[str, Use] = field(default_factory=dict)  # by service, the latest
    # Every (service, address) of the last uses of each token family of the grant: each app
    # instance signed in has its own family, and revoking must reach them all.
    seen_from: set[tuple[str, str | None]] = field(default_factory=set)


def connected_apps(db: Connection, user_id: int, now: int) -> list[ConnectedApp]:
    """Every client the user consented to or holds a live token of, newest grant first."""
    apps: dict[str, ConnectedApp] = {}

    def app(row: Any) -> ConnectedApp:
        return apps.setdefault(row.client_id, ConnectedApp(row.client_id, row.name, row.website))

    for consent in db.execute(sa.select(consents.c.client_id, consents.c.scope, consents.c.updated_at, clients.c.name,
                                        clients.c.website).join(clients).where(consents.c.user_id == user_id)):
        found = app(consent)
        found.scope |= set(consent.scope.split())
        found.granted_at = max(found.granted_at, consent.updated_at)
    live = sa.or_(tokens.c.expires_at > now, tokens.c.refresh_expires_at > now)
    for token in db.execute(sa.select(tokens.c.client_id, tokens.c.scope, tokens.c.refresh_scope, tokens.c.issued_at,
                                      clients.c.name, clients.c.website).join(clients)
                            .where(tokens.c.user_id == user_id, tokens.c.revoked.is_(False), live)):
        found = app(token)
        found.scope |= set((token.refresh_scope or token.scope).split())
        found.granted_at = found.granted_at or token.issued_at
    families = sa.select(tokens.c.client_id, tokens.c.family).where(tokens.c.user_id == user_id).distinct().subquery()
    for use in db.execute(sa.select(families.c.client_id, token_uses).join(
            token_uses, token_uses.c.family == families.c.family)):
        used = apps.get(use.client_id)
        if used is None:
            continue
        used.seen_from.add((use.service, use.address))
        known = used.uses.get(use.service)
        if known is None or use.last_used_at > known.at:
            used.uses[use.service] = Use(use.service, use.last_used_at, use.address)
    return sorted(apps.values(), key=lambda a: (-a.granted_at, a.name))


def revoke_grant(db: Connection, user_id: int, client_id: str) -> int:
    """Forget the user's consent to the client (the next authorization asks again); how many
    consents there were. Its tokens are revoked by `SqlStore.revoke_grant`."""
    return db.execute(consents.delete().where(consents.c.user_id == user_id,
                                              consents.c.client_id == client_id)).rowcount


@dataclass(frozen=True)
class BrowserSession:
    id_digest: str
    created_at: int
    expires_at: int
    amr: tuple[str, ...]
    address: str | None
    user_agent: str | None


def browser_sessions(db: Connection, user_id: int, now: int) -> list[BrowserSession]:
    """The user's live sessions, newest first."""
    return [BrowserSession(row.id_digest, row.created_at, row.expires_at, tuple(row.amr.split()), row.address,
                           row.user_agent)
            for row in db.execute(sessions.select().where(sessions.c.user_id == user_id, sessions.c.expires_at > now)
                                  .order_by(sessions.c.created_at.desc()))]


def end_other_sessions(db: Connection, user_id: int, keep_digest: str | None) -> int:
    """End every session of the user but the one whose digest is `keep_digest`; how many ended."""
    condition = sessions.c.user_id == user_id
    if keep_digest is not None:
        condition = sa.and_(condition, sessions.c.id_digest != keep_digest)
    return db.execute(sessions.delete().where(condition)).rowcount

"""What the pages of /admin share (web/admin.py routes to them): `Act`, an admin's request that
passed the gate, and `Section`, which renders a page for it and records what it changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.web.server import Request

from bearerbridge.audit import AuditValue
from bearerbridge.guard import Recorder
from bearerbridge.oauth.registration import grant_names
from bearerbridge.storage.models import User
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.store import SqlStore
from bearerbridge.web.site import Pages, Reply


def client_path(client_id: str) -> str:
    """The address of a client's page (an id may hold any character)."""
    return f"/admin/clients/{quote(client_id, safe='')}"


@dataclass(frozen=True)
class Act:
    """A request of a signed-in admin: who, from where, the form it posted (first values), the
    CSRF token of the forms the answer shows, and the variable parts of its path (a client's id,
    a user's id), decoded."""

    request: Request
    admin: User
    address: str | None
    form: Mapping[str, str]
    csrf: str
    args: tuple[str, ...] = ()

    @property
    def arg(self) -> str:
        return self.args[0]


class Section:
    """A part of /admin (clients, users): its pages, the store, and the audit log."""

    def __init__(self, pages: Pages, pool: StorePool, audit: Recorder) -> None:
        self.pages = pages
        self.pool = pool
        self.audit = audit

    def render(self, act: Act, status: int, template: str, **values: Any) -> Reply:
        """An admin page: the admin signed in and the forms' CSRF token go to every one."""
        return self.pages.render(status, template, admin=act.admin, csrf=act.csrf, **values)

    async def overview(self, act: Act, notice: str = "") -> Reply:
        """/admin, the front page: every client and every user; where a page returns after a deletion."""
        return self.render(act, 200, "admin.html", notice=notice, **await self.pool.run(_overview, self.pool.store))

    def not_found(self, what: str) -> Reply:
        return self.pages.error(404, "not_found", f"There is no such {what}: it may have been deleted.")

    def record(self, act: Act, action: str, outcome: str = "done", **fields: AuditValue) -> None:
        """An `admin` audit event, as the command line writes one (`action`, `actor`, `outcome`),
        with where the admin was (`address`) and `via` web; never a secret."""
        self.audit.record("admin", action=action, actor=act.admin.username, address=act.address, via="web",
                          outcome=outcome, **fields)


def _overview(store: SqlStore) -> dict[str, Any]:
    """In the pool: the clients with their grants and how many users granted each, and the users
    with who has a second factor."""
    granted, second_factor = store.consent_counts(), store.second_factor_users()
    clients = [{"client": c, "grants": grant_names(c), "path": client_path(c.client_id),
                "granted": granted.get(c.client_id, 0)} for c in store.list_clients()]
    users = [{"user": u, "second_factor": u.id in second_factor} for u in store.list_users()]
    return {"clients": clients, "users": users}

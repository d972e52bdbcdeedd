"""/account/app-passwords: a signed-in user makes and revokes app passwords (issue 12).

An app password is for a client that only knows passwords (a mail relay, a WebDAV sync app): the
user names it, picks the services it may open (those the operator allows them at: `[sasl]
app_passwords`, among the services taking PLAIN and the forward-auth rules taking Basic) and an
expiry. It is shown once, here, and kept as a keyed digest; the SASL validator takes it as the
PLAIN or Basic password of exactly those services (sasl/validator.py), also when the user has
two-factor sign-in on. /account lists the live ones with their last use at each service, and its
Revoke buttons post here: the forms of both pages carry the CSRF token bound to this browser and
session for /account. Revoking one that could open a Dovecot service (IMAP, POP3) ends its live
sessions there (web/mail_kick.py), narrowed to the addresses of its last uses when each has one.
Audit events: app_password_created, app_password_revoked, mail_kick (and, from the use recorder,
app_password_first_use: uses.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.doveadm.protocol import Reach, Target
from bearerbridge.guard import Recorder
from bearerbridge.storage.apppasswords import AppPassword, Listed
from bearerbridge.storage.models import SignIn, User
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.account import AccountSubpage, account_binding, when
from bearerbridge.web.mail_kick import MailKick
from bearerbridge.web.sessions import PasswordLogin, Sessions
from bearerbridge.web.site import BadRequest, Pages, Reply, client_address, row_id

PATH = "/account/app-passwords"
NAME_MAX = 100
SERVICE = "service:"  # the checkboxes' names: service:smtp, service:webdav, ...
EXPIRIES = {"30": 30 * 86400, "90": 90 * 86400, "365": 365 * 86400, "never": None}  # the choices, in seconds
DEFAULT_EXPIRY = "365"


def listed_for_page(found: list[Listed]) -> list[dict[str, Any]]:
    """App passwords as /account and this page show them."""
    return [{"id": item.password.id, "name": item.password.name, "services": sorted(item.password.services),
             "created": when(item.password.created_at),
             "expires": f"expires {when(item.password.expires_at)}" if item.password.expires_at
             else "no expiry: it works until revoked",
             "uses": [(use.service, when(use.at), use.address)
                      for use in sorted(item.uses.values(), key=lambda u: u.service)]}
            for item in found]


class AppPasswordsPage(AccountSubpage):
    """/account/app-passwords (GET shows it, POST makes or revokes one); without a session, /account."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 audit: Recorder, services: Mapping[str, str], require_second_factor: str = "none",
                 mail: MailKick | None = None) -> None:
        super().__init__(pages, issuer, sessions, login, pool, audit)
        self._services = services  # those an app password may be made for, in words (Config.app_password_services)
        self._require_second_factor = require_second_factor
        self._mail = mail if mail is not None else MailKick(None, audit)  # a revoked one's live Dovecot sessions

    adding_steps = frozenset({"create"})

    def _binding(self, request: Request) -> str:
        return account_binding(self._sessions, request)  # /account's Revoke buttons post here

    def _view(self, request: Request, user: User) -> defer.Deferred[Reply]:
        return self._show(request, user)

    def _show(self, request: Request, user: User, status: int = 200, notice: str = "", error: str = "",
              made: dict[str, Any] | None = None, asked: Mapping[str, str] | None = None) -> defer.Deferred[Reply]:
        """The page: the secret just made (`made`, shown this once), the live app passwords, and the
        form to make one (filled in again as `asked` after a refusal)."""
        asked = asked or {}
        chosen = {s for s in self._services if asked.get(SERVICE + s)}
        csrf = self._sessions.csrf_token(request, self._binding(request))
        return self._pool.run(self._pool.store.app_passwords, user.id).addCallback(
            lambda found: self.pages.render(
                status, "app_passwords.html", user=user, notice=notice, error=error, made=made, csrf=csrf,
                passwords=listed_for_page(found), services=self._services, chosen=chosen,
                typed_name=asked.get("name", ""), expiry=asked.get("expiry", DEFAULT_EXPIRY), name_max=NAME_MAX,
                expiries=[("30", "in 30 days"), ("90", "in 90 days"), ("365", "in a year"),
                          ("never", "never (until revoked)")]))

    async def _act(self, request: Request, sign_in: SignIn, form: Mapping[str, str]) -> Reply:
        match form.get("step"):
            case "create" if sign_in.lacks_second_factor(self._require_second_factor):
                # An app password outlives the session: one made from a password-only sign-in
                # would open mail with no second factor ever used.
                return await self._show(request, sign_in.user, 403, asked=form, error=(
                    "This site asks for a second factor before you make app passwords: set up two-factor "
                    "sign-in or a passkey first (a passkey counts once you sign in with it)."))
            case "create":
                return await self._create(request, sign_in.user, form, client_address(request))
            case "revoke":
                return await self._revoke(request, sign_in.user, form.get("id", ""), client_address(request))
        raise BadRequest("step must be create or revoke")

    async def _create(self, request: Request, user: User, form: Mapping[str, str], address: str | None) -> Reply:
        name = " ".join(form.get("name", "").split())
        services = [s for s in self._services if form.get(SERVICE + s)]
        unknown = sorted(k.removeprefix(SERVICE) for k in form if k.startswith(SERVICE)
                         and k.removeprefix(SERVICE) not in self._services)
        expiry = form.get("expiry", "")
        error = ("Give the app password a name, to know it by in the list." if not name
                 else f"A name of at most {NAME_MAX} characters, please." if len(name) > NAME_MAX
                 else f"App passwords cannot open {', '.join(unknown)} here." if unknown
                 else "Pick at least one service the app password may open." if not services
                 else "Pick when the app password expires." if expiry not in EXPIRIES else "")
        if error:
            return await self._show(request, user, 400, error=error, asked=form)
        lifetime = EXPIRIES[expiry]
        expires_at = int(time.time()) + lifetime if lifetime is not None else None
        app_id, secret = await self._pool.run(self._pool.store.create_app_password, user.id, name, services,
                                              expires_at)
        self._audit.record("app_password_created", user=user.username, family=f"app:{app_id}", name=name,
                           services=services, expires_at=expires_at, address=address)
        made = {"name": name, "secret": secret, "services": services, "username": user.username}
        return await self._show(request, user, made=made)

    async def _revoke(self, request: Request, user: User, typed_id: str, address: str | None) -> Reply:
        app_id = row_id(typed_id)
        if app_id is None:
            raise BadRequest("id must be an app password's number")
        revoked, target = await self._pool.run(self._revoked, user, app_id)
        if revoked is None:
            return await self._show(request, user, 400, error="That app password was revoked already.")
        self._audit.record("app_password_revoked", user=user.username, family=revoked.family, name=revoked.name,
                           address=address, by="user")
        notice = f"App password “{revoked.name}” revoked: it no longer opens anything."
        # It may have opened IMAP with PLAIN: the revocation is done whatever Dovecot answers.
        said = await self._mail.end(target, user=user.username, family=revoked.family, address=address, by="user")
        return await self._show(request, user, notice=f"{notice} {said}" if said else notice)

    def _revoked(self, user: User, app_id: int) -> tuple[AppPassword | None, Target | None]:
        """In the pool: revoke the user's app password `app_id` (None if none of theirs was left to
        revoke), and whose live Dovecot sessions that must end, from the services it was made for
        and its last uses read just before. One expired meanwhile is no longer listed: its uses
        unknown, all the user's sessions end if it could open Dovecot's."""
        store = self._pool.store
        listed = (next((item for item in store.app_passwords(user.id) if item.password.id == app_id), None)
                  if self._mail.reaches_dovecot else None)
        revoked = store.revoke_app_password(user.id, app_id)
        if revoked is None:
            return None, None
        uses = listed.uses.values() if listed is not None else ()
        return revoked, self._mail.target(user, Reach.of_app_password(revoked, uses))

"""The users' pages of /admin: add one (an admin or not), and for each user their grants (the
apps they connected, as their own /account shows them), disabling or enabling them (disabling
ends their sessions and revokes every token and app password, as `bearerbridge user disable` does,
and here also ends their live Dovecot sessions: web/mail_kick.py), resetting their second factor,
and signing them out everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bearerbridge.guard import Recorder
from bearerbridge.oauth.registration import NAME_MAX_LENGTH
from bearerbridge.storage.account import ConnectedApp
from bearerbridge.storage.models import User
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.store import SqlStore, StoreError
from bearerbridge.web.account import PASSWORD_MIN_LENGTH, when
from bearerbridge.web.admin_base import Act, Section
from bearerbridge.web.mail_kick import MailKick
from bearerbridge.web.sessions import PasswordLogin
from bearerbridge.web.site import BadRequest, Pages, Reply, row_id


@dataclass(frozen=True)
class Found:
    """A user as their page shows them."""

    user: User
    second_factor: str  # what they have, in words ("an authenticator app and 2 passkeys"); "" for none
    sessions: int
    apps: list[ConnectedApp]


class UserPages(Section):
    def __init__(self, pages: Pages, pool: StorePool, audit: Recorder, login: PasswordLogin,
                 scopes: Mapping[str, str], mail: MailKick | None = None) -> None:
        super().__init__(pages, pool, audit)
        self._login = login
        self._scopes = scopes
        self._mail = mail if mail is not None else MailKick(None, audit)  # a disabled user's live Dovecot sessions

    # -- adding ---------------------------------------------------------------------------------

    async def new(self, act: Act) -> Reply:
        return self._form(act, 200, {"name": "", "email": "", "is_admin": False})

    def _form(self, act: Act, status: int, values: Mapping[str, Any], error: str = "") -> Reply:
        return self.render(act, status, "admin_user_new.html", values=values, error=error,
                           password_min_length=PASSWORD_MIN_LENGTH)

    async def add(self, act: Act) -> Reply:
        form = act.form
        name, email = form.get("name", "").strip(), form.get("email", "").strip()
        values = {"name": name, "email": email, "is_admin": "is_admin" in form}
        password, repeated = form.get("password", ""), form.get("repeat_password", "")
        if len(name) > NAME_MAX_LENGTH or len(email) > NAME_MAX_LENGTH:
            return self._refused(act, values, f"A name or address has at most {NAME_MAX_LENGTH} characters.")
        if len(password) < PASSWORD_MIN_LENGTH or password != repeated:
            return self._refused(act, values, "The password and its repetition differ." if password != repeated
                                 else f"The password must have at least {PASSWORD_MIN_LENGTH} characters.")
        password_hash = await self._login.hash(password)
        try:
            user = await self.pool.run(self.pool.store.add_user, name, email or None, password_hash, None,
                                       "is_admin" in form)
        except StoreError as e:
            return self._refused(act, values, f"{str(e)[:1].upper()}{str(e)[1:]}.")
        self.record(act, "user add", user=user.username, is_admin=user.is_admin)
        return await self._page(act, user.id, notice=f"Added {user.username}"
                                + (", an admin." if user.is_admin else "."))

    def _refused(self, act: Act, values: Mapping[str, Any], reason: str) -> Reply:
        self.record(act, "user add", "refused", reason=reason, user=values["name"] or None)
        return self._form(act, 400, values, error=reason)

    # -- one user -------------------------------------------------------------------------------

    async def show(self, act: Act) -> Reply:
        return await self._page(act, _user_id(act.arg))

    async def _page(self, act: Act, user_id: int, status: int = 200, notice: str = "", error: str = "") -> Reply:
        found = await self.pool.run(_found, self.pool.store, user_id)
        if found is None:
            return self.not_found("user")
        return self.render(act, status, "admin_user.html", found=found, user=found.user, scopes=self._scopes,
                           when=when, notice=notice, error=error)

    async def change(self, act: Act) -> Reply:
        """The user page's forms: disable, enable, reset_second_factor, sign_out."""
        user_id = _user_id(act.arg)
        user = await self.pool.run(self.pool.store.get_user, user_id)
        if user is None:
            return self.not_found("user")
        step, myself = act.form.get("step"), user.id == act.admin.id
        if step == "disable" and myself:
            return await self._page(act, user_id, 400, error="You cannot disable yourself: another admin can, "
                                                             "or the command line (bearerbridge user disable).")
        match step:
            case "disable":
                sessions, tokens = await self.pool.run(self.pool.store.set_disabled, user.username, True)
                self.record(act, "user disable", user=user.username, sessions_ended=sessions, revoked=tokens)
                # Their open IMAP and POP3 sessions, every one: the disabling stands whatever Dovecot answers.
                said = await self._mail.end(self._mail.all_sessions(user), whose=user.username, user=user.username,
                                            actor=act.admin.username, address=act.address, by="admin")
                notice = (f"Disabled {user.username}: {sessions} browser session(s) ended and {tokens} token(s) "
                          f"revoked.{' ' + said if said else ''} Enabling them again brings none of these back.")
            case "enable":
                await self.pool.run(self.pool.store.set_disabled, user.username, False)
                self.record(act, "user enable", user=user.username)
                notice = f"Enabled {user.username}: they can sign in again."
            case "reset_second_factor":
                if not await self.pool.run(self.pool.store.reset_second_factor, user.id):
                    return await self._page(act, user_id, 400, error=f"{user.username} has no second factor.")
                self.record(act, "user reset_second_factor", user=user.username)
                notice = (f"{user.username}'s second factor is reset: they sign in with their password alone "
                          "until they set one up again.")
            case "sign_out":
                ended = await self.pool.run(self.pool.store.end_other_sessions, user.id, None)
                self.record(act, "user end_sessions", user=user.username, sessions_ended=ended)
                notice = (f"Signed {user.username} out everywhere: {ended} browser session(s) ended"
                          + (", this one too: you will be asked to sign in again." if myself else
                             ". Apps they connected keep their access."))
            case _:
                raise BadRequest("step must be disable, enable, reset_second_factor or sign_out")
        return await self._page(act, user_id, notice=notice)


def _user_id(arg: str) -> int:
    """A user's id from the path; a path naming none is not found (id 0 is no one's)."""
    return row_id(arg) or 0


def _found(store: SqlStore, user_id: int) -> Found | None:
    """In the pool: a user with their second factor, live sessions and connected apps."""
    user = store.get_user(user_id)
    if user is None:
        return None
    totp, keys = store.second_factors(user_id)
    held = (["an authenticator app"] if totp else []) + (
        [f"{len(keys)} passkey{'' if len(keys) == 1 else 's'}"] if keys else [])
    return Found(user, " and ".join(held), len(store.browser_sessions(user_id)), store.connected_apps(user_id))

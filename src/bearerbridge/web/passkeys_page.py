"""/account/passkeys: a signed-in user adds passkeys (WebAuthn), names them, sees when each was
last used, and removes them.

Adding one: the page carries navigator.credentials.create's options (a discoverable credential
for this site's host name, the user's random handle, their passkeys excluded) and a challenge
signed for this browser and session (web/passkeys.py); /static/passkeys.js posts the browser's
answer back, checked by the `webauthn` library. Once a user has a passkey, signing in with the
password asks for it (or for a TOTP code, if that is on too) and the passkey alone signs in
from the sign-in pages. Removing one asks for the password or a current code from the
authenticator app, as turning TOTP off does. Every form is a POST with a CSRF token bound to
this browser and session. Audit events: passkey_added, passkey_renamed, passkey_removed (each
naming the passkey).
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge import passkeys
from bearerbridge.guard import Recorder
from bearerbridge.passkeys import PasskeyRefused
from bearerbridge.storage.models import SignIn, User
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.account import AccountSubpage, proof_refused, when
from bearerbridge.web.passkeys import Passkeys
from bearerbridge.web.sessions import PasswordLogin, Sessions
from bearerbridge.web.site import BadRequest, Pages, Reply, client_address

PATH = "/account/passkeys"


class PasskeysPage(AccountSubpage):
    """/account/passkeys (GET shows it, POST takes its forms); without a session, /account."""

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, passkeys: Passkeys,
                 pool: StorePool, audit: Recorder) -> None:
        super().__init__(pages, issuer, sessions, login, pool, audit)
        self._passkeys = passkeys

    adding_steps = frozenset({"register"})

    def _binding(self, request: Request) -> str:
        return f"passkeys|{self._sessions.session_id(request) or ''}"

    def _view(self, request: Request, user: User) -> defer.Deferred[Reply]:
        return defer.Deferred.fromCoroutine(self._show(request, user))

    async def _show(self, request: Request, user: User, status: int = 200, notice: str = "",
                    error: str = "") -> Reply:
        store = self._pool.store
        keys = await self._pool.run(store.passkeys, user.id)
        two_factor_on = await self._pool.run(store.two_factor_enabled, user.id)
        handle = await self._pool.run(store.passkey_handle, user.id) or passkeys.new_user_handle()
        csrf = self._sessions.csrf_token(request, self._binding(request))
        form = self._passkeys.registration_form(request, self._binding(request), user, handle, keys) \
            if len(keys) < passkeys.MAX_PASSKEYS else None
        listed = [{"key": k, "created": when(k.created_at), "used": when(k.last_used_at)} for k in keys]
        return self.pages.render(status, "passkeys.html", user=user, passkeys=listed, passkey=form, csrf=csrf,
                                 action=PATH, notice=notice, error=error, rp=self._passkeys.rp,
                                 two_factor_on=two_factor_on, full=len(keys) >= passkeys.MAX_PASSKEYS)

    async def _act(self, request: Request, sign_in: SignIn, form: Mapping[str, str]) -> Reply:
        user, address, store = sign_in.user, client_address(request), self._pool.store
        match form.get("step"):
            case "register":
                return await self._register(request, user, form, address)
            case "rename":
                name, credential_id = passkeys.display_name(form.get("name", ""), ""), form.get("credential_id", "")
                old = await self._pool.run(store.passkey, credential_id)
                if old is None or old.user_id != user.id:
                    return await self._show(request, user, 404, error="That passkey is not one of yours.")
                await self._pool.run(store.rename_passkey, user.id, credential_id, name)
                self._audit.record("passkey_renamed", user=user.username, address=address, name=old.name,
                                   new_name=name)
                return await self._show(request, user, notice=f"Renamed to “{name}”.")
            case "remove":
                refused = await proof_refused(self._login, request, user, form.get("proof", ""))
                if refused:
                    return await self._show(request, user, refused[0], error=refused[1])
                found = await self._pool.run(store.passkey, form.get("credential_id", ""))
                if found is None or found.user_id != user.id:
                    return await self._show(request, user, 404, error="That passkey is not one of yours.")
                await self._pool.run(store.remove_passkeys, user.id, [found.credential_id])
                self._audit.record("passkey_removed", user=user.username, address=address, name=found.name)
                return await self._show(request, user, notice=f"Passkey “{found.name}” removed: it no longer signs "
                                                              "you in.")
        raise BadRequest("step must be register, rename or remove")

    async def _register(self, request: Request, user: User, form: Mapping[str, str], address: str | None) -> Reply:
        store = self._pool.store
        try:
            new, offered = self._passkeys.registered(request, self._binding(request), form)
        except PasskeyRefused as e:
            self._audit.record("passkey_refused", user=user.username, address=address, detail=str(e)[:200])
            return await self._show(request, user, 400, error=(
                "The passkey was not added: the page was too old, or the browser's answer was not for this "
                "site. Try again."))
        # The handle the options offered, unless the user has one by now (two pages open at once).
        handle = await self._pool.run(store.passkey_handle, user.id) or offered
        name = passkeys.display_name(form.get("name", ""), new.transports)
        if not await self._pool.run(store.add_passkey, user.id, handle, new, name):
            return await self._show(request, user, 400, error="That passkey is added already, or you have "
                                                              f"{passkeys.MAX_PASSKEYS} passkeys.")
        self._audit.record("passkey_added", user=user.username, address=address, name=name, transports=new.transports)
        return await self._show(request, user, notice=f"Passkey “{name}” added. It signs you in without a "
                                                      "password, and after your password as a second factor.")

"""/account/two-factor: a signed-in user turns two-factor sign-in (TOTP) on or off.

Turning it on: the page makes a secret (kept sealed, waiting), shows it as a QR code (an inline
SVG drawn here: no script, nothing from elsewhere) and as text to type, with a link for a phone
to open its own authenticator app; it is on once the user types a current code from the app,
and then the page shows ten recovery codes, once (kept as keyed digests). Turning it off and
making new recovery codes each ask for a current code or the password, checked at the sign-in
door (counted as guesses are). Every form is a POST with a CSRF token bound to this browser and
session. Audit events: two_factor_enabled, two_factor_disabled, recovery_codes_made (and, at
sign-in, recovery_code_used: web/second_factor.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup
from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge import otp
from bearerbridge.guard import Recorder
from bearerbridge.storage.models import SignIn, User
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.account import AccountSubpage, proof_refused, when
from bearerbridge.web.second_factor import AMR
from bearerbridge.web.sessions import PasswordLogin, Sessions
from bearerbridge.web.site import BadRequest, Pages, Reply, client_address

PATH = "/account/two-factor"


class TwoFactorPage(AccountSubpage):
    """/account/two-factor (GET shows it, POST takes its forms); without a session, /account."""

    def __init__(self, pages: Pages, issuer: str, site_name: str, sessions: Sessions, login: PasswordLogin,
                 pool: StorePool, audit: Recorder) -> None:
        super().__init__(pages, issuer, sessions, login, pool, audit)
        self._site_name = site_name  # the issuer an authenticator app lists the codes under

    adding_steps = frozenset({"begin", "confirm", "new_codes"})

    def _binding(self, request: Request) -> str:
        return f"two-factor|{self._sessions.session_id(request) or ''}"

    def _view(self, request: Request, user: User) -> defer.Deferred[Reply]:
        return self._show(request, user)

    # -- showing -------------------------------------------------------------------------------

    def _show(self, request: Request, user: User, status: int = 200, notice: str = "", error: str = "",
              codes: list[str] | None = None) -> defer.Deferred[Reply]:
        """The page as the user's two-factor sign-in stands: off, waiting for a first code (the QR
        code), on; or the recovery codes just made (`codes`)."""
        def read() -> dict[str, Any]:
            store = self._pool.store
            return {"state": store.two_factor(user.id), "secret": store.waiting_totp_secret(user.id)}
        csrf = self._sessions.csrf_token(request, self._binding(request))
        return self._pool.run(read).addCallback(
            lambda found: self.pages.render(status, "two_factor.html", user=user, notice=notice, error=error,
                                            codes=codes, csrf=csrf, enabled_at=when(found["state"].enabled_at),
                                            **self._setup(found["secret"], user), **found))

    def _setup(self, secret: str | None, user: User) -> dict[str, Any]:
        """What the app needs, for a secret waiting for its first code: the QR code, the text."""
        if secret is None:
            return {"qr": None, "uri": None, "grouped": None}
        uri = otp.provisioning_uri(secret, user.username, self._site_name)
        # Markup: segno's own SVG of a URI it encodes as modules, not as text; its title is ours.
        return {"qr": Markup(otp.qr_svg(uri)), "uri": uri, "grouped": otp.grouped(secret)}

    # -- the forms -----------------------------------------------------------------------------

    async def _act(self, request: Request, sign_in: SignIn, form: Mapping[str, str]) -> Reply:
        user, address = sign_in.user, client_address(request)
        store = self._pool.store
        match form.get("step"):
            case "begin":
                if not await self._pool.run(store.begin_totp, user.id, otp.new_secret()):
                    return await self._show(request, user, 400, error="Two-factor sign-in is on already.")
                return await self._show(request, user)
            case "confirm":
                codes = otp.new_recovery_codes()
                if not await self._pool.run(store.confirm_totp, user.id, form.get("code", ""), codes):
                    return await self._show(request, user, 400, error=(
                        "That code is not the one your app shows now. Check that the app added the key "
                        "above, wait for a new code, and type it."))
                self._audit.record("two_factor_enabled", user=user.username, method="totp", address=address)
                await self._counts_for_this_session(request)
                self._audit.record("recovery_codes_made", user=user.username, count=len(codes), address=address)
                return await self._show(request, user, notice="Two-factor sign-in is on.", codes=codes)
            case "new_codes" | "disable" as step:
                refused = await proof_refused(self._login, request, user, form.get("proof", ""))
                if refused:
                    return await self._show(request, user, refused[0], error=refused[1])
                return await (self._new_codes(request, user, address) if step == "new_codes"
                              else self._disable(request, user, address))
        raise BadRequest("step must be begin, confirm, new_codes or disable")

    async def _counts_for_this_session(self, request: Request) -> None:
        """A code just proven counts for the session it was set up in, as if it had signed in with
        it (`[server] require_second_factor`)."""
        session_id = self._sessions.session_id(request)
        if session_id is not None:
            await self._pool.run(self._pool.store.add_to_session, session_id, AMR)

    async def _new_codes(self, request: Request, user: User, address: str | None) -> Reply:
        codes = otp.new_recovery_codes()
        if not await self._pool.run(self._pool.store.two_factor_enabled, user.id):
            return await self._show(request, user, 400, error="Two-factor sign-in is off: there are no recovery "
                                                              "codes to replace.")
        await self._pool.run(self._pool.store.replace_recovery_codes, user.id, codes)
        self._audit.record("recovery_codes_made", user=user.username, count=len(codes), address=address)
        return await self._show(request, user, notice="New recovery codes made: the old ones no longer work.",
                                codes=codes)

    async def _disable(self, request: Request, user: User, address: str | None) -> Reply:
        if await self._pool.run(self._pool.store.disable_two_factor, user.id):
            self._audit.record("two_factor_disabled", user=user.username, address=address, by="user")
            return await self._show(request, user, notice="Two-factor sign-in is off: your password alone "
                                                          "signs you in.")
        return await self._show(request, user, 400, error="Two-factor sign-in was off already.")

"""/account: the user's own page, after they sign in.

It shows the apps they connected (each grant, the scopes in words, when it was granted, and when
and from where it was last used at each service) with a Revoke button that ends the grant's
tokens and forgets the consent; their browser sessions, with signing out the others or all; and
a form to change the password (which ends every other session, and says so). Every form is a
POST with a CSRF token bound to this browser and session; the page works without JavaScript.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Request

from bearerbridge import otp
from bearerbridge.doveadm.protocol import Reach, Target
from bearerbridge.guard import Blocked, Recorder
from bearerbridge.storage.models import SignIn, User
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.mail_kick import MailKick
from bearerbridge.web.second_factor import SecondFactorAsked, second_factor_page
from bearerbridge.web.sessions import SIGN_IN_STEPS, PasswordLogin, Sessions, SignedIn, refused_sign_in
from bearerbridge.web.site import (
    BadRequest,
    NotFound,
    PageResource,
    Pages,
    Reply,
    client_address,
    retry_after,
    snapshot,
)

PASSWORD_MIN_LENGTH = 8
PATH = "/account"
RECENT_SIGN_IN = 15 * 60  # seconds after a sign-in in which the pages that add ways in ask nothing more


def recent(sign_in: SignIn) -> bool:
    """Whether the user signed in (or confirmed it was them) within RECENT_SIGN_IN."""
    return time.time() - sign_in.auth_time < RECENT_SIGN_IN


def when(seconds: int | None) -> str:
    """A moment as the page shows it (UTC; the page has no script to learn the browser's zone)."""
    return "never" if not seconds else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def account_binding(sessions: Sessions, request: Request) -> str:
    """The CSRF binding of /account's forms, which /account/app-passwords shares (the Revoke
    buttons of its app passwords on /account post there)."""
    return f"account|{sessions.session_id(request) or ''}"


async def proof_refused(login: PasswordLogin, request: Request, user: User, proof: str) -> tuple[int, str] | None:
    """Why (a status and words) `proof`, a current code from the user's authenticator app (six
    digits) or their password, does not show that it is the user at the keyboard, if it does not:
    asked before undoing a second factor, so that a session left open is not enough. Checked at
    the sign-in door, as guesses are."""
    if otp.typed_code(proof):
        checked: Any = await login.second_factor.attempt(request, user, proof, failure="two_factor_check_failed")
        wrong = "That code is wrong, or was used already: wait for the next one."
    else:
        checked = await login.verify(request, user.username, proof)
        wrong = "That password is wrong."
    if isinstance(checked, Blocked):
        return 429, f"Too many wrong codes or passwords: try again in {checked.in_words}."
    return (400, wrong) if checked is None else None


class AccountSubpage(PageResource):
    """A page below /account where a signed-in user adds or removes ways in (passkeys, app
    passwords, two-factor sign-in): GET shows it (`_view`), POST takes its forms (`_act`), each
    with a CSRF token bound to this browser and session (`_binding`); without a session, both send
    the browser to /account to sign in.

    Only a recent sign-in, within RECENT_SIGN_IN, sees the page or takes its `adding_steps`:
    otherwise the user first confirms it is them (the password, or a current code from their app),
    which starts this browser a new session. A session cookie copied, or a browser left signed in,
    is then not enough to add a way in that outlives the session, such as a passkey or an app
    password. Taking a way in away (a Revoke button on /account, say) needs no recent sign-in."""

    adding_steps: frozenset[str] = frozenset()  # the forms' steps that add a way in

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 audit: Recorder) -> None:
        super().__init__(pages)
        self._issuer = issuer
        self._sessions = sessions
        self._login = login
        self._pool = pool
        self._audit = audit

    def render_GET(self, request: Request) -> int:
        return self._answer(request, lambda r: self._sessions.sign_in(r).addCallback(self._get, r))

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    def _binding(self, request: Request) -> str:
        raise NotImplementedError

    def _view(self, request: Request, user: User) -> defer.Deferred[Reply]:
        """The page as GET shows it."""
        raise NotImplementedError

    async def _act(self, request: Request, sign_in: SignIn, form: Mapping[str, str]) -> Reply:
        """One of the page's forms, its CSRF token checked, from a recent sign-in."""
        raise NotImplementedError

    def _get(self, sign_in: SignIn | None, request: Request) -> Reply | defer.Deferred[Reply]:
        if sign_in is None:
            return to_account()
        if not recent(sign_in):
            return self._confirm_page(request, sign_in.user)
        return self._view(request, sign_in.user)

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        form = snapshot(request, self._issuer).form
        if not self._sessions.csrf_ok(request, form, self._binding(request)):
            return self.pages.form_expired()
        return self._sessions.sign_in(request).addCallback(
            lambda sign_in: defer.Deferred.fromCoroutine(self._signed_in_post(request, sign_in, form)) if sign_in
            else to_account())

    async def _signed_in_post(self, request: Request, sign_in: SignIn, form: Mapping[str, str]) -> Reply:
        if form.get("step") == "confirm_identity":
            return await self._confirm(request, sign_in, form.get("proof", ""))
        if form.get("step") in self.adding_steps and not recent(sign_in):
            return self._confirm_page(request, sign_in.user, 403, error=(
                "It is a while since you signed in: confirm it is you, then do that again."))
        return await self._act(request, sign_in, form)

    def _confirm_page(self, request: Request, user: User, status: int = 200, error: str = "") -> Reply:
        return self.pages.render(status, "confirm_identity.html", user=user, action=request.path.decode("latin-1"),
                                 csrf=self._sessions.csrf_token(request, self._binding(request)), error=error,
                                 minutes=RECENT_SIGN_IN // 60)

    async def _confirm(self, request: Request, sign_in: SignIn, proof: str) -> Reply:
        """The password or a current code proves it is the user: this browser signs in afresh (a
        new session, the old one ended), and goes back to the page as GET."""
        refused = await proof_refused(self._login, request, sign_in.user, proof)
        if refused:
            return self._confirm_page(request, sign_in.user, refused[0], refused[1])
        old = self._sessions.session_id(request)
        await self._sessions.start(request, sign_in.user, sign_in.amr)
        if old is not None:
            await self._pool.run(self._pool.store.end_session, old)
        self._audit.record("identity_confirmed", user=sign_in.user.username, address=client_address(request),
                           page=request.path.decode("latin-1"))
        return Reply(303, b"", {b"Location": request.path})


def to_account() -> Reply:
    """Off to /account, which asks for the sign-in."""
    return Reply(303, b"", {b"Location": PATH.encode()})


class Account(PageResource):
    """/account (GET shows it, POST takes its forms and the sign-in form); its pages below it are
    children (/account/two-factor: web/twofactor.py; /account/app-passwords: web/app_passwords.py)."""

    isLeaf = False

    def __init__(self, pages: Pages, issuer: str, sessions: Sessions, login: PasswordLogin, pool: StorePool,
                 audit: Recorder, scopes: Mapping[str, str], mail: MailKick | None = None) -> None:
        super().__init__(pages)
        self._issuer = issuer
        self._sessions = sessions
        self._login = login
        self._pool = pool
        self._audit = audit
        self._scopes = scopes
        self._mail = mail if mail is not None else MailKick(None, audit)  # a revoked grant's live Dovecot sessions

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound(self.pages)  # /account/ is /account

    def render_GET(self, request: Request) -> int:
        return self._answer(request, lambda r: self._sessions.sign_in(r).addCallback(self._show, r))

    def render_POST(self, request: Request) -> int:
        return self._answer(request, self._post)

    # -- showing -------------------------------------------------------------------------------

    def _binding(self, request: Request) -> str:
        return account_binding(self._sessions, request)

    def _show(self, sign_in: SignIn | None, request: Request, status: int = 200, notice: str = "",
              error: str = "") -> Reply | defer.Deferred[Reply]:
        if sign_in is None:
            return self._login_page(request, failed=False)
        return self._pool.run(self._read, sign_in.user).addCallback(
            lambda found: self.pages.render(status, "account.html", user=sign_in.user, notice=notice, error=error,
                                            csrf=self._sessions.csrf_token(request, self._binding(request)),
                                            password_min_length=PASSWORD_MIN_LENGTH,
                                            current=self._current_digest(request), **found))

    def _current_digest(self, request: Request) -> str | None:
        session_id = self._sessions.session_id(request)
        return self._pool.store.keyring.digest(session_id) if session_id else None

    def _read(self, user: User) -> dict[str, Any]:
        """In the pool: the user's apps and sessions, as the page shows them."""
        from bearerbridge.web.app_passwords import listed_for_page  # here: that module imports `when` from this one

        store = self._pool.store
        apps = [{"client_id": app.client_id, "name": app.name, "website": app.website,
                 "scopes": [(s, self._scopes.get(s, s)) for s in sorted(app.scope)],
                 "granted": when(app.granted_at),
                 "uses": [(use.service, when(use.at), use.address) for use in sorted(app.uses.values(),
                                                                                     key=lambda u: u.service)]}
                for app in store.connected_apps(user.id)]
        sessions = [{"digest": s.id_digest, "started": when(s.created_at), "address": s.address,
                     "agent": s.user_agent, "amr": s.amr} for s in store.browser_sessions(user.id)]
        return {"apps": apps, "sessions": sessions, "two_factor": store.two_factor(user.id),
                "passkey_count": len(store.passkeys(user.id)),
                "app_passwords": listed_for_page(store.app_passwords(user.id))}

    def _login_page(self, request: Request, failed: bool, blocked: Blocked | None = None) -> Reply:
        csrf = self._sessions.csrf_token(request, "account-login")
        return self.pages.render(429 if blocked else 401 if failed else 200, "login.html", client_name=None,
                                 failed=refused_sign_in(request) if failed else None, action=PATH, csrf=csrf,
                                 passkey=self._login.passkey_form(request),
                                 blocked_wait=blocked.in_words if blocked else None,
                                 headers=retry_after(blocked.retry_after if blocked else None))

    # -- the forms --------------------------------------------------------------------------------

    def _post(self, request: Request) -> Reply | defer.Deferred[Reply]:
        form = snapshot(request, self._issuer).form
        if form.get("step") in SIGN_IN_STEPS:
            if not self._sessions.csrf_ok(request, form, "account-login"):
                return self.pages.form_expired()
            return self._login(request, form).addCallback(self._signed_in, request)
        if not self._sessions.csrf_ok(request, form, self._binding(request)):
            return self.pages.form_expired()
        return self._sessions.sign_in(request).addCallback(self._act, request, form)

    def _signed_in(self, outcome: SignedIn | SecondFactorAsked | Blocked | None, request: Request) -> Reply:
        if isinstance(outcome, SignedIn):
            return to_account()
        if isinstance(outcome, SecondFactorAsked):
            return second_factor_page(self.pages, outcome, PATH, self._sessions.csrf_token(request, "account-login"),
                                      None)
        return self._login_page(request, failed=True, blocked=outcome)

    def _act(self, sign_in: SignIn | None, request: Request, form: Mapping[str, str]
             ) -> Reply | defer.Deferred[Reply]:
        if sign_in is None:  # the session ended since the page was shown
            return self._login_page(request, failed=False)
        user, address = sign_in.user, client_address(request)
        match form.get("step"):
            case "revoke":
                client_id = form.get("client_id", "")
                return self._pool.run(self._revoke, user, client_id).addCallback(
                    self._revoked, request, sign_in, client_id, address)
            case "sign_out_others":
                return self._pool.run(self._pool.store.end_other_sessions, user.id,
                                      self._sessions.session_id(request)).addCallback(
                    self._signed_out_others, request, sign_in, address)
            case "sign_out_everywhere":
                return self._pool.run(self._pool.store.end_other_sessions, user.id, None).addCallback(
                    self._signed_out_everywhere, request, user, address)
            case "password":
                return defer.Deferred.fromCoroutine(self._change_password(request, sign_in, form, address))
        raise BadRequest("step must be revoke, sign_out_others, sign_out_everywhere or password")

    def _revoke(self, user: User, client_id: str) -> tuple[int, int, Target | None]:
        """In the pool: revoke the grant (tokens revoked, consents forgotten), and whose live
        Dovecot sessions that must end, from the grant's scopes and last uses read just before."""
        store = self._pool.store
        if not self._mail.reaches_dovecot:
            return (*store.revoke_grant(user.id, client_id), None)
        app = next((app for app in store.connected_apps(user.id) if app.client_id == client_id), None)
        target = self._mail.target(user, Reach.of_grant(app) if app else None)
        return (*store.revoke_grant(user.id, client_id), target)

    def _revoked(self, outcome: tuple[int, int, Target | None], request: Request, sign_in: SignIn, client_id: str,
                 address: str | None) -> Reply | defer.Deferred[Reply]:
        tokens, consents, target = outcome
        if not tokens and not consents:
            return self._show(sign_in, request, 400, error="That app has no access to revoke.")
        self._audit.record("grant_revoked", user=sign_in.user.username, client_id=client_id, revoked=tokens,
                           address=address, by="user")
        notice = "Access revoked: the app's tokens no longer work, and it must ask you again before it gets any."
        if target is None:
            return self._show(sign_in, request, notice=notice)
        # The revocation is done whatever Dovecot answers: the page says what became of the sessions.
        ended = defer.Deferred.fromCoroutine(self._mail.end(target, user=sign_in.user.username, client_id=client_id,
                                                            address=address))
        return ended.addCallback(lambda said: self._show(sign_in, request, notice=f"{notice} {said}"))

    def _signed_out_others(self, ended: int, request: Request, sign_in: SignIn, address: str | None
                           ) -> Reply | defer.Deferred[Reply]:
        self._audit.record("sessions_ended", user=sign_in.user.username, ended=ended, address=address, kept="this")
        return self._show(sign_in, request, notice=f"Signed out {ended} other browser session(s).")

    def _signed_out_everywhere(self, ended: int, request: Request, user: User, address: str | None) -> Reply:
        self._audit.record("sessions_ended", user=user.username, ended=ended, address=address, kept="none")
        self._sessions.forget(request)
        return self.pages.render(200, "logout.html", done=True)

    async def _change_password(self, request: Request, sign_in: SignIn, form: Mapping[str, str],
                               address: str | None) -> Reply:
        new, repeated = form.get("new_password", ""), form.get("repeat_password", "")
        if len(new) < PASSWORD_MIN_LENGTH or new != repeated:
            return await self._shown(sign_in, request, 400, error=(
                "The new password and its repetition differ." if new != repeated
                else f"The new password must have at least {PASSWORD_MIN_LENGTH} characters."))
        checked = await self._login.verify(request, sign_in.user.username, form.get("current_password", ""))
        if isinstance(checked, Blocked):
            return await self._shown(sign_in, request, 429, error=f"Too many wrong passwords: try again in "
                                                                   f"{checked.in_words}.")
        if checked is None:
            return await self._shown(sign_in, request, 400, error="The current password is wrong.")
        password_hash = await self._login.hash(new)
        ended = await self._pool.run(self._pool.store.set_password, sign_in.user.username, password_hash)
        self._audit.record("password_changed", user=sign_in.user.username, sessions_ended=ended, address=address)
        # Every session ended with the old password, this one too: this browser gets a new one.
        signed_in = await self._sessions.start(request, sign_in.user, sign_in.amr)
        return await self._shown(signed_in.sign_in, request, notice=(
            f"Password changed. Every other browser signed in as you ({max(ended - 1, 0)} session(s)) was signed "
            "out; apps you connected keep their access."))

    async def _shown(self, sign_in: SignIn, request: Request, status: int = 200, notice: str = "",
                     error: str = "") -> Reply:
        shown = self._show(sign_in, request, status, notice, error)
        return await shown if isinstance(shown, defer.Deferred) else shown

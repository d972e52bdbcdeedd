"""Who the browser is: the login session cookie, CSRF tokens for forms, and the password login.

A session is a row in the store (`SqlStore.start_session`) for `[server] session_ttl` seconds;
the cookie holds its id, 256 random bits of which only the digest is kept. Logout, a password
change and a disabled user end sessions at the server, so a copied cookie dies with them.
Every form carries a CSRF token bound to this browser (a random cookie) and to what the form is
for (`binding`: the very request, the step, the session), so a token taken from one form is
refused by any other.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet import defer
from twisted.web.server import Request

from bearerbridge.crypto import hash_password, verify_login
from bearerbridge.guard import Blocked, DatabaseDoor, Recorder
from bearerbridge.metrics import Metrics
from bearerbridge.passkeys import PasskeyRefused
from bearerbridge.storage.models import SignIn, User
from bearerbridge.storage.pool import StorePool
from bearerbridge.web.passkeys import PasskeyForm, Passkeys
from bearerbridge.web.second_factor import SecondFactor, SecondFactorAsked
from bearerbridge.web.site import client_address, posted_form

SESSION_COOKIE = b"bb_session"
CSRF_COOKIE = b"bb_csrf"
CSRF_TTL = 900
# A browser that has signed in as a user is let past that user's throttling block for this long.
KNOWN_COOKIE = b"bb_known"
KNOWN_TTL = 180 * 24 * 3600
BROWSER_ID_BYTES = 16
_BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(BROWSER_ID_BYTES)
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # crypto.new_secret()


@dataclass(frozen=True)
class SignedIn:
    """A user who has just signed in, and the session started for them."""

    sign_in: SignIn
    session_id: str

    @property
    def user(self) -> User:
        return self.sign_in.user


class Sessions:
    """Cookies: the login session and the browser's CSRF secret. `HttpOnly`, `SameSite=Lax`,
    and `Secure` when the issuer is https."""

    def __init__(self, pool: StorePool, session_ttl: int, secure: bool) -> None:
        self._pool = pool
        self._keyring = pool.store.keyring
        self._session_ttl = session_ttl
        self._secure = secure

    def _set_cookie(self, request: Request, name: bytes, value: str, max_age: int | None) -> None:
        request.addCookie(name, value.encode(), path=b"/", httpOnly=True, sameSite=b"lax", secure=self._secure,
                          max_age=None if max_age is None else str(max_age).encode())

    def session_id(self, request: Request) -> str | None:
        """The id in the session cookie, if it has the form of one (whether it is live, the store says)."""
        value = (request.getCookie(SESSION_COOKIE) or b"").decode("latin-1")
        return value if _SESSION_ID.fullmatch(value) else None

    def sign_in(self, request: Request) -> defer.Deferred[SignIn | None]:
        """Who signed in, when and how, if the browser's session is live."""
        session_id = self.session_id(request)
        if session_id is None:
            return defer.succeed(None)
        return self._pool.run(self._pool.store.session, session_id)

    def start(self, request: Request, user: User, amr: tuple[str, ...] = ("pwd",)) -> defer.Deferred[SignedIn]:
        """Start a session of `user`, signed in by `amr`, and give this browser its cookie."""
        auth_time = int(time.time())

        def started(session_id: str) -> SignedIn:
            self._set_cookie(request, SESSION_COOKIE, session_id, self._session_ttl)
            request.received_cookies[SESSION_COOKIE] = session_id.encode()  # the rest of this request sees it
            return SignedIn(SignIn(user, auth_time, amr), session_id)
        agent = (request.getHeader(b"user-agent") or b"").decode("latin-1") or None
        return self._pool.run(self._pool.store.start_session, user.id, self._session_ttl, amr, client_address(request),
                              agent).addCallback(started)

    def forget(self, request: Request) -> None:
        """Tell the browser to drop its session cookie (the session has ended at the server)."""
        self._set_cookie(request, SESSION_COOKIE, "", 0)

    def end(self, request: Request) -> defer.Deferred[None]:
        """End this browser's session at the server, and forget the cookie."""
        self.forget(request)
        session_id = self.session_id(request)
        return defer.succeed(None) if session_id is None else self._pool.run(self._pool.store.end_session, session_id)

    def csrf_token(self, request: Request, binding: str) -> str:
        """A form token bound to this browser (a cookie, set now if missing or not one we would
        have made) and to `binding`."""
        return self._keyring.sign(_csrf_purpose(self._browser(request), binding), "form")

    def _browser(self, request: Request) -> str:
        """This browser's CSRF cookie, given it now if it has none (or none we would have made)."""
        browser = _browser_id(request)
        if browser is None:
            browser = secrets.token_urlsafe(BROWSER_ID_BYTES)
            self._set_cookie(request, CSRF_COOKIE, browser, None)
            request.received_cookies[CSRF_COOKIE] = browser.encode()
        return browser

    def csrf_ok(self, request: Request, form: Mapping[str, str], binding: str) -> bool:
        """Whether the form's `csrf` field was made by `csrf_token` for this browser and binding,
        less than CSRF_TTL seconds ago."""
        browser = _browser_id(request)
        token = form.get("csrf", "")
        return browser is not None and bool(token) and self._keyring.unsign(
            _csrf_purpose(browser, binding), token, CSRF_TTL) == "form"

    def bind_to_browser(self, request: Request, binding: str, payload: str) -> str:
        """`payload` signed for this browser and `binding`: what a form carries from one step to
        the next (web/second_factor.py), useless in another browser or for another binding."""
        return self._keyring.sign("carried " + json.dumps([self._browser(request), binding]), payload)

    def bound_to_browser(self, request: Request, binding: str, value: str, max_age: int) -> str | None:
        """The payload of a value `bind_to_browser` made for this browser and `binding` less than
        `max_age` seconds ago, else None."""
        browser = _browser_id(request)
        return None if browser is None or not value else self._keyring.unsign(
            "carried " + json.dumps([browser, binding]), value, max_age)

    def known_browser(self, request: Request, username: str) -> bool:
        """Whether this browser has signed in as `username` (case-folded) before (`remember_browser`)."""
        value = (request.getCookie(KNOWN_COOKIE) or b"").decode("latin-1")
        return bool(value) and self._keyring.unsign("known browser", value, KNOWN_TTL) == self._known(username)

    def remember_browser(self, request: Request, username: str) -> None:
        """Note in a cookie that this browser signed in as `username` (its digest: no name in clear)."""
        self._set_cookie(request, KNOWN_COOKIE, self._keyring.sign("known browser", self._known(username)),
                         KNOWN_TTL)

    def _known(self, username: str) -> str:
        return self._keyring.digest("known browser " + username.casefold())


def _browser_id(request: Request) -> str | None:
    """The browser's CSRF cookie, if it has the form `csrf_token` gives it: a cookie planted with
    other characters (a `|`, say) must not be able to make one binding read as another."""
    value = (request.getCookie(CSRF_COOKIE) or b"").decode("latin-1")
    return value if _BROWSER_ID.fullmatch(value) else None


def _csrf_purpose(browser: str, binding: str) -> str:
    """What a form token is a MAC of: the browser and the binding, in an encoding with one reading."""
    return "csrf " + json.dumps([browser, binding])


# The sign-in forms' steps that PasswordLogin takes: the password, the second factor after it, a
# passkey alone. Every page with a sign-in form hands it these.
SIGN_IN_STEPS = frozenset({"login", "second_factor", "passkey"})


def refused_sign_in(request: Request) -> str:
    """Which sign-in a refused form was, for the page to say: "passkey" (Sign in with a passkey)
    or "password"."""
    return "passkey" if posted_form(request).get("step") == ["passkey"] else "password"


class PasswordLogin:
    """The login form's check, shared by /authorize, /device and /account: throttled per user name
    and per address (`guard.DatabaseDoor`), with at most `checks_at_once` argon2 verifications
    running, so that memory stays under that many times argon2's memory cost however many try at
    once. A user with two-factor sign-in on is asked for a code before any session starts
    (`second_factor`, web/second_factor.py: the form's `step=second_factor`). With `passkeys`
    (web/passkeys.py), a passkey signs in without a password (`step=passkey`, `passkey_form`)
    or after it, as the second factor of a user who has one."""

    def __init__(self, pool: StorePool, sessions: Sessions, metrics: Metrics, door: DatabaseDoor,
                 audit: Recorder, checks_at_once: int, passkeys: Passkeys | None = None) -> None:
        self._pool = pool
        self._sessions = sessions
        self._metrics = metrics
        self._door = door
        self._audit = audit
        self._checks = defer.DeferredSemaphore(checks_at_once)
        metrics.password_checks_waiting.set_function(lambda: len(self._checks.waiting))
        self.second_factor = SecondFactor(pool, sessions, door, audit, passkeys)
        self.passkeys = passkeys

    def __call__(self, request: Request, form: Mapping[str, str]
                 ) -> defer.Deferred[SignedIn | SecondFactorAsked | Blocked | None]:
        """Check a login form's username and password; on success start a session, or ask for the
        second factor first. A browser that has signed in as this user before is not held back by
        the user's block, only its address's: so that whoever knows a user's name cannot shut them out."""
        if form.get("step") == "second_factor":
            return defer.Deferred.fromCoroutine(self._second_step(request, form))
        if form.get("step") == "passkey":
            return defer.Deferred.fromCoroutine(self._passkey(request, form))
        username, address = form.get("username", ""), client_address(request)
        known = self._sessions.known_browser(request, username)
        keys = self._door.keys(None if known else username, address)
        return defer.Deferred.fromCoroutine(self._door.attempt(
            keys, lambda: self._check(request, username, form.get("password", ""), address)))

    def verify(self, request: Request, username: str, password: str) -> defer.Deferred[User | Blocked | None]:
        """Check a signed-in user's password again (to change it, to confirm it is them), under the
        same throttle as a sign-in, starting no session; as at sign-in, a browser that has signed in
        as them before is held back only by its address's count, not by the user's."""
        address = client_address(request)
        known = self._sessions.known_browser(request, username)
        keys = self._door.keys(None if known else username, address)
        return defer.Deferred.fromCoroutine(self._door.attempt(
            keys, lambda: self._verified(username, password, address)))

    def hash(self, password: str) -> defer.Deferred[str]:
        """An argon2id hash of a new password, counted among the checks running at once."""
        return self._checks.run(self._pool.run_apart, hash_password, password)

    async def _verified(self, username: str, password: str, address: str | None) -> User | None:
        """Read the password hash (pool) and verify it (argon2id, slow on purpose: away from the
        store's threads, a few at a time); a failure goes to the audit log."""
        found = await self._pool.run(self._pool.store.password_hash, username)
        user = await self._checks.run(self._pool.run_apart, verify_login, found, password)
        if user is None:
            reason = "unknown_user" if found[0] is None else "disabled" if found[0].disabled else "wrong_password"
            self._audit.record("sign_in_failed", user=username, address=address, reason=reason)
        return user

    async def _check(self, request: Request, username: str, password: str, address: str | None
                     ) -> SignedIn | SecondFactorAsked | None:
        """Verify the password, and start a session (unless a second factor is due)."""
        user = await self._verified(username, password, address)
        self._metrics.logins.labels("ok" if user else "failed").inc()
        if user is None:
            return None
        totp, keys = await self._pool.run(self._pool.store.second_factors, user.id)
        if totp or keys:
            return self.second_factor.ask(request, user, totp, keys)
        return await self._start(request, user, ("pwd",), address)

    def passkey_form(self, request: Request) -> PasskeyForm | None:
        """The login page's "Sign in with a passkey" form (none where passkeys cannot work)."""
        return self.passkeys.sign_in_form(request) if self.passkeys else None

    async def _passkey(self, request: Request, form: Mapping[str, str]) -> SignedIn | Blocked | None:
        """A sign-in with a passkey alone: the authenticator names the user (its user handle) and
        verified them (WebAuthn's UV flag). Throttled per address: there is no name to count by."""
        address = client_address(request)

        async def check() -> SignedIn | None:
            if self.passkeys is None:
                return None
            try:
                stored, proven = await self.passkeys.assertion(request, form, None)
            except PasskeyRefused as e:
                self._audit.record("sign_in_failed", user=None, address=address, reason="passkey", detail=str(e)[:200])
                return None
            user = await self._pool.run(self._pool.store.get_user, stored.user_id)
            if user is None or user.disabled:
                self._audit.record("sign_in_failed", user=user.username if user else None, address=address,
                                   reason="disabled")
                return None
            return await self._start(request, user, proven.amr(after_password=False), address)
        outcome = await self._door.attempt(self._door.keys(None, address), check)
        self._metrics.logins.labels("failed" if outcome is None else "ok").inc()
        return outcome

    async def _second_step(self, request: Request, form: Mapping[str, str]) -> SignedIn | SecondFactorAsked:
        """Check the second factor (throttled in `SecondFactor`), and start the session."""
        proven = await self.second_factor.check(request, form)
        if isinstance(proven, SecondFactorAsked):
            return proven
        user, amr = proven
        return await self._start(request, user, amr, client_address(request))

    async def _start(self, request: Request, user: User, amr: tuple[str, ...], address: str | None) -> SignedIn:
        self._audit.record("sign_in", user=user.username, address=address, amr=list(amr))
        self._sessions.remember_browser(request, user.username)
        return await self._sessions.start(request, user, amr)

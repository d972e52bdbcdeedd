"""Two-factor sign-in in process, over the whole HTTP tree and a real SQLite store: enrolment on
/account/two-factor (the QR code, the key, a first code, the recovery codes shown once), the
second step of a sign-in at /authorize, /device and /account (a code from pyotp, a wrong or
replayed code refused, a recovery code working once, amr ["pwd", "otp", "mfa"] in the ID token), what
the second step cannot be made to skip, its throttle, and every new form's CSRF token."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pyotp
import pytest

from bearerbridge import config as configuration
from bearerbridge import crypto
from bearerbridge.oauth import device
from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import totp_secrets
from bearerbridge.web import second_factor

from ..fakes import (
    CODE_GRANTS,
    PASSWORD,
    Answer,
    Bridge,
    Http,
    NewUser,
    form_of,
    redirect_params,
    sqlite_bridge,
    tokens_of,
)
from ..support import authorize_url, pkce_pair
from .test_openid import verified
from .test_throttle import SIGN_IN  # no delay before the fifth failure; the account blocked at 5, the address at 8

CB = "https://rp.example/cb"
PAGE = "/account/two-factor"
# A relying party and a device (tests/web/test_second_factor_required.py's too).
CLIENTS = (
    Client("rp", "Relying Party", (CB,), "openid profile imap", CODE_GRANTS, public=False),
    Client("tv", "TV", (), "imap", (device.GRANT_TYPE,), public=True),
)
ALICE = NewUser("alice", "alice@example.org")


@pytest.fixture
def bridge(tmp_path) -> Iterator[Bridge]:
    config = configuration.Config(throttle=configuration.ThrottleSettings(sign_in=SIGN_IN))
    with sqlite_bridge(tmp_path / "x.db", CLIENTS, [ALICE, NewUser("bob")], config) as bridge:
        yield bridge


def text(answer: Answer) -> str:
    return answer.body.decode()


def codes_of(secret: str) -> dict[int, str]:
    """The codes of the step before now, now's and the next (each accepted, once), taken away
    from a step's end so that the step does not change while a test uses them."""
    while time.time() % 30 > 27:
        time.sleep(0.1)
    now = time.time()
    return {offset: pyotp.TOTP(secret).at(now + 30 * offset) for offset in (-1, 0, 1)}


def password_on(browser: Http, path: str, username: str = "alice") -> Answer:
    """Post the right password in the sign-in form of `path`; the page it got."""
    action, fields = form_of(browser.get(path))
    return browser.post(action, data={**fields, "username": username, "password": PASSWORD})


def account_browser(bridge: Bridge, username: str = "alice") -> Http:
    browser = bridge.browser()
    assert password_on(browser, "/account", username).code == 303
    return browser


def enrol(bridge: Bridge, browser: Http) -> tuple[str, list[str]]:
    """Turn two-factor sign-in on from the page, confirming with the code of the step before now;
    the secret read off the page and the recovery codes it showed."""
    action, fields = form_of(browser.get(PAGE))
    assert fields["step"] == "begin"
    page = browser.post(action, data=fields)
    assert page.code == 200, text(page)
    secret = re.search(r'id="secret">([A-Z2-7 ]+)<', text(page)).group(1).replace(" ", "")
    action, fields = form_of(page)
    assert fields["step"] == "confirm"
    done = browser.post(action, data={**fields, "code": codes_of(secret)[-1]})
    assert done.code == 200 and "Two-factor sign-in is on." in text(done), text(done)
    return secret, re.findall(r"<li><code>([a-z2-9]{5}-[a-z2-9]{5})</code></li>", text(done))


def password_at_authorize(bridge: Bridge, browser: Http, username: str = "alice") -> tuple[str, Answer]:
    """Open a code grant's /authorize and post the right password; the URL and the page it got."""
    _, challenge = pkce_pair()
    path = authorize_url("", "rp", CB, challenge, "openid imap", nonce="n-1")
    return path, password_on(browser, path, username)


def second_step(browser: Http, page: Answer, code: str = "", recovery_code: str = "") -> Answer:
    action, fields = form_of(page)
    assert fields["step"] == "second_factor", text(page)
    typed = {"recovery_code": recovery_code} if recovery_code else {"code": code}
    return browser.post(action, data={**fields, **typed})


def has_session(answer: Answer) -> bool:
    return any(c.startswith("bb_session=") and not c.startswith("bb_session=;")
               for c in answer.headers.getRawHeaders("Set-Cookie") or [])


# -- enrolment ---------------------------------------------------------------------------------

def test_enrolment_shows_a_qr_code_and_the_key_and_turns_on_with_a_current_code(bridge):
    browser = account_browser(bridge)
    assert 'id="two-factor-state">Off' in text(browser.get("/account"))
    assert 'id="two-factor-off"' in text(browser.get(PAGE))
    action, fields = form_of(browser.get(PAGE))
    page = browser.post(action, data=fields)
    body = text(page)
    assert '<svg viewBox="0 0 ' in body and "<script" not in body and "<img" not in body  # drawn here, inline
    secret = re.search(r'id="secret">([A-Z2-7 ]+)<', body).group(1).replace(" ", "")
    assert len(secret) == 32
    uri = re.search(r'href="(otpauth://[^"]+)" id="open-app"', body).group(1)
    assert pyotp.parse_uri(uri.replace("&amp;", "&")).secret == secret
    assert "issuer=bearerbridge" in uri and "totp/bearerbridge:alice" in uri
    action, fields = form_of(page)
    wrong = browser.post(action, data={**fields, "code": "000000" if codes_of(secret)[0] != "000000" else "111111"})
    assert wrong.code == 400 and "not the one your app shows now" in text(wrong)
    with bridge.store.transaction():
        sealed = bridge.store._db.execute(totp_secrets.select()).one().sealed
    assert secret not in sealed and secret.lower() not in sealed  # kept sealed, never in clear
    done = browser.post(action, data={**fields, "code": codes_of(secret)[0]})
    codes = re.findall(r"<li><code>([a-z2-9]{5}-[a-z2-9]{5})</code></li>", text(done))
    assert len(set(codes)) == 10 and "shown only this once" in text(done)
    again = text(browser.get(PAGE))
    assert 'id="two-factor-on"' in again and 'id="recovery-left">10<' in again
    assert not any(code in again for code in codes)  # shown once
    assert 'id="two-factor-state">On' in text(browser.get("/account"))
    assert [e["user"] for e in bridge.audit.of("two_factor_enabled")] == ["alice"]
    assert [e["count"] for e in bridge.audit.of("recovery_codes_made")] == [10]


def test_the_page_wants_a_session(bridge):
    answer = bridge.browser().get(PAGE)
    assert answer.code == 303 and answer.header("Location") == "/account"
    assert bridge.browser().get("/account/nothing-here").code == 404


# -- the second step at /authorize -------------------------------------------------------------

def test_after_the_password_a_code_from_the_app_starts_the_session_and_the_grant_goes_on(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    _, asked = password_at_authorize(bridge, browser)
    assert asked.code == 200 and 'name="pending"' in text(asked) and "Relying Party" in text(asked)
    assert not has_session(asked)  # nothing started before the code
    consent = second_step(browser, asked, codes_of(secret)[0])
    assert consent.code == 200 and has_session(consent)
    action, fields = form_of(consent)
    assert fields["step"] == "consent"
    assert redirect_params(browser.post(action, data={**fields, "decision": "approve"}))["code"]
    assert bridge.audit.of("sign_in")[-1] == {"user": "alice", "address": "127.0.0.1", "amr": ["pwd", "otp", "mfa"]}


def test_amr_in_the_id_token_of_a_code_grant_is_pwd_otp_and_mfa(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    verifier, challenge = pkce_pair()
    path = authorize_url("", "rp", CB, challenge, "openid imap", nonce="n-1")
    asked = password_on(browser, path)
    consent = second_step(browser, asked, codes_of(secret)[1])
    action, fields = form_of(consent)
    code = redirect_params(browser.post(action, data={**fields, "decision": "approve"}))["code"]
    tokens = tokens_of(bridge.browser().post("/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier,
        "client_id": "rp", "client_secret": "rp-secret"}))
    _, claims = verified(bridge, tokens["id_token"])
    assert claims["amr"] == ["pwd", "otp", "mfa"] and claims["nonce"] == "n-1"


def test_a_wrong_code_and_a_replayed_code_are_refused(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    codes = codes_of(secret)
    first = bridge.browser()
    _, asked = password_at_authorize(bridge, first)
    wrong = second_step(first, asked, "123456" if "123456" not in codes.values() else "654321")
    assert wrong.code == 401 and "That code is wrong" in text(wrong) and not has_session(wrong)
    assert form_of(second_step(first, wrong, codes[0]))[1]["step"] == "consent"  # the form is shown again
    second = bridge.browser()
    _, asked = password_at_authorize(bridge, second)
    replayed = second_step(second, asked, codes[0])
    assert replayed.code == 401 and not has_session(replayed)
    earlier = second_step(second, asked, codes[-1])  # an earlier step than one accepted: refused too
    assert earlier.code == 401
    assert [e["reason"] for e in bridge.audit.of("sign_in_failed")] == ["wrong_code", "reused_code", "reused_code"]
    assert form_of(second_step(second, asked, codes[1]))[1]["step"] == "consent"


def test_a_recovery_code_works_once(bridge):
    _, recovery = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    _, asked = password_at_authorize(bridge, browser)
    assert 'name="recovery_code"' in text(asked)
    typed = recovery[3].upper().replace("-", " ")  # as read off paper: case, spaces
    assert form_of(second_step(browser, asked, recovery_code=typed))[1]["step"] == "consent"
    assert bridge.audit.of("recovery_code_used") == [{"user": "alice", "left": 9, "address": "127.0.0.1"}]
    again = bridge.browser()
    _, asked = password_at_authorize(bridge, again)
    spent = second_step(again, asked, recovery_code=recovery[3])
    assert spent.code == 401 and not has_session(spent)
    assert second_step(again, asked, recovery_code="zzzzz-zzzzz").code == 401  # not one of hers
    assert form_of(second_step(again, asked, recovery_code=recovery[4]))[1]["step"] == "consent"
    _, recovery_of_bob = enrol(bridge, account_browser(bridge, "bob"))
    other = bridge.browser()
    _, asked = password_at_authorize(bridge, other)
    assert second_step(other, asked, recovery_code=recovery_of_bob[0]).code == 401  # bob's code is not alice's


def test_the_second_step_cannot_be_skipped_by_posting_the_consent_form(bridge):
    enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    path, asked = password_at_authorize(bridge, browser)
    _, fields = form_of(asked)
    answer = browser.post(path, data={"csrf": fields["csrf"], "step": "consent", "decision": "approve"})
    assert answer.code == 200 and form_of(answer)[1]["step"] == "login" and "Location" not in str(answer.headers)
    assert not has_session(answer) and not bridge.audit.of("consent")
    assert browser.get(path).code == 200 and form_of(browser.get(path))[1]["step"] == "login"  # no session
    assert "Sign in to see" in text(browser.get("/account"))


def test_what_the_password_proved_is_bound_to_the_browser_the_page_and_its_minutes(bridge, monkeypatch):
    secret, _ = enrol(bridge, account_browser(bridge))
    codes = codes_of(secret)
    browser = bridge.browser()
    path, asked = password_at_authorize(bridge, browser)
    _, fields = form_of(asked)
    for pending in ("", "1.1.forged", fields["pending"].replace(".", "x", 1)):
        answer = browser.post(path, data={**fields, "pending": pending, "code": codes[0]})
        assert answer.code == 400 and 'id="second-factor-expired"' in text(answer) and not has_session(answer)
    # another page of this browser (another /authorize request) does not take it
    other_path, other = password_at_authorize(bridge, browser)
    _, other_fields = form_of(other)
    answer = browser.post(other_path, data={**other_fields, "pending": fields["pending"], "code": codes[0]})
    assert answer.code == 400 and 'id="second-factor-expired"' in text(answer)
    # another browser, with this one's form and its own CSRF cookie, does not either
    thief = bridge.browser()
    _, thief_page = password_at_authorize(bridge, thief, "bob")
    thief_csrf = form_of(thief_page)[1]["csrf"]
    assert thief.post(path, data={**fields, "csrf": thief_csrf, "code": codes[0]}).code == 400
    # PENDING_TTL seconds after the password, it must be typed again (the form's CSRF token lives longer)

    class Later:
        @staticmethod
        def time() -> float:
            return time.time() + second_factor.PENDING_TTL + 1

    with monkeypatch.context() as patched:
        patched.setattr(crypto, "time", Later)
        late = browser.post(path, data={**fields, "code": codes[0]})
    assert late.code == 400 and 'id="second-factor-expired"' in text(late) and 'href="/authorize?' in text(late)
    assert form_of(browser.post(path, data={**fields, "code": codes[0]}))[1]["step"] == "consent"  # in time


def test_wrong_codes_are_throttled_like_wrong_passwords(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    right = codes_of(secret)[0]
    wrong = "123456" if right != "123456" else "654321"
    browser = bridge.browser()
    _, asked = password_at_authorize(bridge, browser)
    action, fields = form_of(asked)
    for _ in range(4):
        assert browser.post(action, data={**fields, "code": wrong}).code == 401  # answered at once
    held = browser.pending("POST", action, data={**fields, "code": wrong})
    assert held == []  # the fifth failure waits
    bridge.clock.advance(1.0)
    browser.flush()
    assert held[0].code == 401
    blocked = browser.post(action, data={**fields, "code": right})  # even the right code is not checked
    assert blocked.code == 429 and "try again in 5 minutes" in text(blocked) and not has_session(blocked)
    assert blocked.header("Retry-After") == "299"
    assert bridge.audit.of("throttled") == [{"door": "sign_in", "account": "second factor of alice", "seconds": 300}]
    # The right password again does not clear the count of wrong codes.
    _, asked = password_at_authorize(bridge, browser)
    assert second_step(browser, asked, right).code == 429
    bridge.clock.advance(300)
    assert form_of(second_step(browser, asked, right))[1]["step"] == "consent"


# -- the second step at /device and /account ---------------------------------------------------

def test_the_device_page_asks_for_the_code_before_the_device_code(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    asked = password_on(browser, "/device")
    assert asked.code == 200 and "A device" in text(asked) and not has_session(asked)
    page = second_step(browser, asked, codes_of(secret)[0])
    assert page.code == 200 and form_of(page)[1]["step"] == "code" and has_session(page)
    with bridge.store.transaction():
        sessions = bridge.store.browser_sessions(bridge.store.get_user_by_name("alice").id)
    # the enrolling one (the code it set up counts for it) and this one
    assert sorted(s.amr for s in sessions) == [("pwd", "otp", "mfa"), ("pwd", "otp", "mfa")]


def test_signing_in_to_the_account_page_asks_for_the_code(bridge):
    secret, _ = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    asked = password_on(browser, "/account")
    assert asked.code == 200 and 'id="second-factor-user">alice<' in text(asked) and not has_session(asked)
    assert "Sign in to see" in text(browser.get("/account"))
    done = second_step(browser, asked, codes_of(secret)[0])
    assert done.code == 303 and done.header("Location") == "/account"
    assert 'id="account-user">alice' in text(browser.get("/account"))


def test_a_user_without_two_factor_signs_in_with_the_password_alone(bridge):
    browser = bridge.browser()
    _, consent = password_at_authorize(bridge, browser)
    assert form_of(consent)[1]["step"] == "consent"
    assert bridge.audit.of("sign_in")[-1]["amr"] == ["pwd"]


# -- turning it off, new recovery codes --------------------------------------------------------

def test_turning_off_needs_a_current_code_or_the_password(bridge):
    browser = account_browser(bridge)
    secret, _ = enrol(bridge, browser)
    action, fields = form_of(browser.get(PAGE))  # the first form: new recovery codes
    page = text(browser.get(PAGE))
    assert 'value="disable"' in page
    disable = {**fields, "step": "disable"}
    assert browser.post(action, data={**disable, "proof": "wrong password"}).code == 400
    wrong_code = browser.post(action, data={**disable, "proof": "000000" if codes_of(secret)[0] != "000000"
                                            else "111111"})
    assert wrong_code.code == 400 and "That code is wrong" in text(wrong_code)
    assert [e["reason"] for e in bridge.audit.of("two_factor_check_failed")] == ["wrong_code"]
    off = browser.post(action, data={**disable, "proof": PASSWORD})
    assert off.code == 200 and 'id="two-factor-off"' in text(off)
    assert bridge.audit.of("two_factor_disabled")[0]["user"] == "alice"
    _, consent = password_at_authorize(bridge, bridge.browser())
    assert form_of(consent)[1]["step"] == "consent"  # the password alone again


def test_new_recovery_codes_replace_the_old_ones(bridge):
    browser = account_browser(bridge)
    secret, old = enrol(bridge, browser)
    action, fields = form_of(browser.get(PAGE))
    assert fields["step"] == "new_codes"
    made = browser.post(action, data={**fields, "proof": codes_of(secret)[0]})
    new = re.findall(r"<li><code>([a-z2-9]{5}-[a-z2-9]{5})</code></li>", text(made))
    assert made.code == 200 and len(new) == 10 and not set(new) & set(old)
    assert len(bridge.audit.of("recovery_codes_made")) == 2
    other = bridge.browser()
    _, asked = password_at_authorize(bridge, other)
    assert second_step(other, asked, recovery_code=old[0]).code == 401
    assert form_of(second_step(other, asked, recovery_code=new[0]))[1]["step"] == "consent"


# -- CSRF --------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["begin", "confirm", "new_codes", "disable"])
def test_every_form_of_the_page_needs_its_csrf_token(bridge, step):
    browser = account_browser(bridge)
    if step in ("new_codes", "disable"):
        enrol(bridge, browser)
    fields = {"step": step, "code": "123456", "proof": PASSWORD}
    for csrf in (None, "forged", form_of(account_browser(bridge, "bob").get(PAGE))[1]["csrf"],
                 form_of(browser.get("/account"))[1]["csrf"]):
        answer = browser.post(PAGE, data={**fields, **({"csrf": csrf} if csrf else {})})
        assert answer.code == 400 and "The form has expired" in text(answer), csrf
    assert not bridge.audit.of("two_factor_disabled")


@pytest.mark.parametrize("where", ["authorize", "device", "account"])
def test_the_code_form_needs_its_csrf_token(bridge, where):
    secret, _ = enrol(bridge, account_browser(bridge))
    browser = bridge.browser()
    if where == "authorize":
        _, asked = password_at_authorize(bridge, browser)
    else:
        asked = password_on(browser, "/device" if where == "device" else "/account")
    action, fields = form_of(asked)
    code = codes_of(secret)[0]
    for csrf in (None, "forged", form_of(bridge.browser().get("/account"))[1]["csrf"]):
        data = {**fields, "code": code}
        data.pop("csrf")
        answer = browser.post(action, data={**data, **({"csrf": csrf} if csrf else {})})
        assert answer.code == 400 and "The form has expired" in text(answer) and not has_session(answer), csrf
    assert not bridge.audit.of("sign_in_failed")  # refused before any code was checked
    assert has_session(browser.post(action, data={**fields, "code": code}))

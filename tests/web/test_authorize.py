"""/authorize and /logout in process: the whole HTTP tree over a real SQLite store and a pool
without threads, driven as a browser drives it (cookies kept, redirects returned).

Path 1, steps 1 to 3: the login page, the password check, the consent page and its answer,
the CSRF tokens that bind each form to its browser and request, and the error pages.
"""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs

from bearerbridge.crypto import hash_password
from bearerbridge.storage.models import Client

from ..fakes import Answer, Bridge, Http, cheap_password_hash, form_of, login_and_consent, redirect_params, sqlite_store
from ..support import authorize_url, pkce_pair

ISSUER = "http://127.0.0.1:8080"
CB = "https://app.example/cb"
CODE_GRANT = ("authorization_code", "refresh_token")
PASSWORD = "correct horse battery"


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("web", "Web App", (CB,), "imap smtp", CODE_GRANT, public=False), "web-secret")
        store.add_client(Client("native", "Native App", ("http://127.0.0.1/callback",), "imap smtp", CODE_GRANT,
                                public=True), None)
        store.add_client(Client("local", "Local App", ("http://127.0.0.1:8765/cb",), "imap", CODE_GRANT,
                                public=False), "local-secret")
        store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
    yield Bridge.over(store)
    store.engine.dispose()


def url(client_id: str = "web", redirect_uri: str = CB, scope: str | None = "imap", challenge: str | None = "new",
        **extra: str) -> str:
    """/authorize?... for a code grant with a fresh PKCE S256 challenge and state st-123."""
    if challenge == "new":
        _, challenge = pkce_pair()
    return authorize_url("", client_id, redirect_uri, challenge, scope, **extra)


def consent_of(bridge: Bridge, username: str = "alice", client_id: str = "web") -> set[str]:
    with bridge.store.transaction():
        return bridge.store.consented_scope(bridge.store.get_user_by_name(username).id, client_id)


def set_cookies(answer: Answer) -> str:
    return "\n".join(answer.headers.getRawHeaders("Set-Cookie") or [])


def text(answer: Answer) -> str:
    return answer.body.decode()


def logged_in(bridge: Bridge, path: str, username: str = "alice", password: str = PASSWORD):
    """A browser that has posted the login form of `path`, and the page it got."""
    browser = bridge.browser()
    action, fields = form_of(browser.get(path))
    return browser, browser.post(action, data={**fields, "username": username, "password": password})


# -- the login page ------------------------------------------------------------------------------

def test_a_get_shows_the_login_page_with_a_csrf_field(bridge):
    path = url()
    page = bridge.browser().get(path)
    assert page.code == 200 and "Sign in" in text(page) and "Web App" in text(page)
    assert page.header("Content-Type") == "text/html; charset=utf-8" and page.header("Cache-Control") == "no-store"
    action, fields = form_of(page)
    assert action == path  # the form posts back to the very request
    assert fields["step"] == "login" and len(fields["csrf"]) > 20
    cookie = set_cookies(page)
    assert "bb_csrf=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "bb_session" not in cookie and "Secure" not in cookie  # Secure only with an https issuer


def test_the_right_password_signs_in_and_shows_the_consent_page(bridge):
    with bridge.store.transaction():  # a real argon2id hash, as `bearerbridge user add` makes it
        bridge.store.add_user("bob", None, hash_password("bob's password"))
    path = url(scope="imap smtp")
    browser, page = logged_in(bridge, path, "bob", "bob's password")
    assert page.code == 200, text(page)
    assert "Signed in as <strong>bob</strong>" in text(page) and "Web App" in text(page)
    assert "Read and manage your mail (IMAP)" in text(page) and "Send mail as you (SMTP)" in text(page)
    cookie = set_cookies(page)
    assert "bb_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    action, fields = form_of(page)
    assert action == path
    assert fields["step"] == "consent" and fields["csrf"]
    assert bridge.count("bearerbridge_logins_total", result="ok") == 1
    # signed in: the next visit skips the login page
    again = browser.get(path)
    assert again.code == 200 and form_of(again)[1]["step"] == "consent"


def test_wrong_password(bridge):
    browser, page = logged_in(bridge, url(), "alice", "wrong")
    assert page.code == 401 and "Wrong username or password" in text(page)
    assert "bb_session" not in set_cookies(page)
    assert bridge.count("bearerbridge_logins_total", result="failed") == 1
    action, fields = form_of(page)  # the form is there to try again
    assert fields["step"] == "login"
    again = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD})
    assert again.code == 200 and form_of(again)[1]["step"] == "consent"


def test_an_unknown_username_is_refused_as_a_wrong_password_is(bridge):
    _, page = logged_in(bridge, url(), "nobody", PASSWORD)
    assert page.code == 401 and "Wrong username or password" in text(page)
    assert "bb_session" not in set_cookies(page)


def test_a_disabled_user_cannot_sign_in(bridge):
    with bridge.store.transaction():
        bridge.store.set_disabled("alice", True)
    _, page = logged_in(bridge, url())
    assert page.code == 401 and "Wrong username or password, or the account is disabled" in text(page)
    assert "bb_session" not in set_cookies(page)


# -- consent -------------------------------------------------------------------------------------

def test_approving_redirects_to_the_client_with_a_code_the_state_and_the_issuer(bridge):
    browser, page = logged_in(bridge, url())
    action, fields = form_of(page)
    answer = browser.post(action, data={**fields, "decision": "approve"})
    assert answer.code == 303  # after a POST: a 302 would let the browser post the form on (RFC 9700 §4.12)
    assert answer.header("Location").startswith(CB + "?")
    params = redirect_params(answer)
    assert set(params) == {"code", "state", "iss"}
    assert params["state"] == "st-123" and params["iss"] == ISSUER  # RFC 9207
    with bridge.store.transaction():
        assert bridge.store.find_code(params["code"]).scope == "imap"
    assert consent_of(bridge) == {"imap"}


def test_denied_consent(bridge):
    browser = bridge.browser()
    params = redirect_params(login_and_consent(browser, url(), "alice", PASSWORD, decision="deny"))
    assert params["error"] == "access_denied" and params["state"] == "st-123" and "code" not in params
    assert params["iss"] == ISSUER
    assert consent_of(bridge) == set()
    assert form_of(browser.get(url()))[1]["step"] == "consent"  # nothing was remembered


def test_consent_is_remembered_for_the_same_or_fewer_scopes(bridge):
    redirect_params(login_and_consent(bridge.browser(), url(scope="imap smtp"), "alice", PASSWORD))
    browser, response = logged_in(bridge, url(scope="smtp"))  # another browser, the same user
    assert response.code == 303 and "code" in redirect_params(response)  # no consent page the second time
    again = browser.get(url(scope="imap"))
    assert again.code == 302 and "code" in redirect_params(again)  # a GET's redirect stays a 302


def test_a_decision_must_be_approve_or_deny(bridge):
    browser, page = logged_in(bridge, url())
    action, fields = form_of(page)
    answer = browser.post(action, data={**fields, "decision": "maybe"})
    assert answer.code == 400 and 'id="error">invalid_request' in text(answer)
    assert "decision must be approve or deny" in text(answer) and answer.header("Location") is None


# -- CSRF: every form is bound to its browser and its request --------------------------------------

@pytest.mark.parametrize("tamper", ["missing", "forged", "other-browser"])
def test_forms_need_their_csrf_token(bridge, tamper):
    browser = bridge.browser()
    action, fields = form_of(browser.get(url()))
    fields.update(username="alice", password=PASSWORD)
    if tamper == "missing":
        del fields["csrf"]
    elif tamper == "forged":
        fields["csrf"] = fields["csrf"][:-4] + "AAAA"
    else:
        browser = bridge.browser()  # the form, but not the cookie it was made for
    page = browser.post(action, data=fields)
    assert page.code == 400 and 'id="error">invalid_request' in text(page)
    assert "The form has expired" in text(page)
    assert "bb_session" not in set_cookies(page)
    assert bridge.count("bearerbridge_logins_total", result="ok") == 0  # the password was never checked


def test_a_login_token_from_another_request_is_refused(bridge):
    browser = bridge.browser()
    _, fields = form_of(browser.get(url(scope="imap")))
    page = browser.post(url(scope="imap smtp"), data={**fields, "username": "alice", "password": PASSWORD})
    assert page.code == 400 and "The form has expired" in text(page)
    assert "bb_session" not in set_cookies(page)


def test_consent_token_is_bound_to_the_request(bridge):
    """A consent form's token cannot approve a different request (say, wider scopes)."""
    _, challenge = pkce_pair()
    narrow = authorize_url("", "web", CB, challenge, "imap")
    wide = authorize_url("", "web", CB, challenge, "imap smtp")
    browser, page = logged_in(bridge, narrow)
    _, consent = form_of(page)
    page = browser.post(wide, data={**consent, "decision": "approve"})
    assert page.code == 400 and 'id="error">invalid_request' in text(page)
    assert consent_of(bridge) == set()


@pytest.mark.parametrize("tamper", ["missing", "the-login-forms", "other-browser"])
def test_the_consent_form_needs_its_own_csrf_token(bridge, tamper):
    path = url()
    browser = bridge.browser()
    action, login = form_of(browser.get(path))
    action, consent = form_of(browser.post(action, data={**login, "username": "alice", "password": PASSWORD}))
    form = {**consent, "decision": "approve"}
    if tamper == "missing":
        del form["csrf"]
    elif tamper == "the-login-forms":
        form["csrf"] = login["csrf"]
    else:
        browser = bridge.browser()
    page = browser.post(action, data=form)
    assert page.code == 400 and "The form has expired" in text(page) and page.header("Location") is None
    assert consent_of(bridge) == set()


def test_a_consent_form_approves_nothing_after_a_logout(bridge):
    """Its token is bound to the user who was shown it: signed out, it approves nothing."""
    path = url()
    browser, page = logged_in(bridge, path)
    action, consent = form_of(page)
    _, logout = form_of(browser.get("/logout"))
    assert browser.post("/logout", data=logout).code == 200
    page = browser.post(action, data={**consent, "decision": "approve"})
    assert page.code == 400 and "The form has expired" in text(page)
    assert consent_of(bridge) == set()


# -- /logout ---------------------------------------------------------------------------------------

def test_logout_ends_the_session(bridge):
    path = url()
    browser = bridge.browser()
    login_and_consent(browser, path, "alice", PASSWORD)
    assert "Sign in" not in text(browser.get(path))
    page = browser.get("/logout")
    action, fields = form_of(page)
    done = browser.post(action, data=fields)
    assert "signed out" in text(done)
    assert "bb_session=;" in set_cookies(done) and "Max-Age=0" in set_cookies(done)
    assert "Sign in" in text(browser.get(path))


@pytest.mark.parametrize("tamper", ["missing", "forged", "the-login-forms"])
def test_logout_needs_its_csrf_token(bridge, tamper):
    """Else any page could sign the user out."""
    path = url()
    browser = bridge.browser()
    _, login = form_of(browser.get(path))
    login_and_consent(browser, path, "alice", PASSWORD)
    _, fields = form_of(browser.get("/logout"))
    if tamper == "missing":
        del fields["csrf"]
    else:
        fields["csrf"] = fields["csrf"][:-4] + "AAAA" if tamper == "forged" else login["csrf"]
    page = browser.post("/logout", data=fields)
    assert page.code == 400 and "The form has expired" in text(page)
    assert "bb_session" not in set_cookies(page)
    assert "Sign in" not in text(browser.get(path))  # still signed in


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_client_gets_an_error_page_not_a_redirect(bridge):
    page = bridge.browser().get(url(client_id="no-such-client"))
    assert page.code == 400 and page.header("Location") is None
    assert 'id="error">invalid_client' in text(page)
    assert page.header("Content-Type") == "text/html; charset=utf-8"


def test_authorize_without_parameters_reads_well_to_a_person(bridge):
    """Not authlib's garbled "response_type=The response type 'None' is not supported ...": what
    this address is for and what to do, with the OAuth error code kept below for developers."""
    for path in ("/authorize", "/authorize?foo=bar"):
        page = bridge.browser().get(path)
        assert page.code == 400 and page.header("Location") is None
        assert "This request cannot be completed." in text(page)
        assert ("This address is where an app sends you to ask for access to your account, and this visit did not "
                "come with an app&#39;s request. To give an app access, start from the app.") in text(page)
        assert 'Error code: <code id="error">unsupported_response_type</code>' in text(page)
        assert "None" not in text(page)


def test_an_app_s_garbled_request_tells_the_person_to_go_back_to_the_app(bridge):
    page = bridge.browser().get("/authorize?response_type=token%20nonsense&client_id=no-such-client")
    assert page.code == 400 and 'id="error">unsupported_response_type' in text(page)
    assert ("The app that sent you here made a mistake: it asked for a kind of access this server does not give "
            "(response_type must be code). Nothing was shared with the app. Go back to it and try again; if this "
            "page comes back, tell its developers.") in text(page).replace("&#39;", "'")
    page = bridge.browser().get(url(client_id="no-such-client"))
    assert "it is not registered with this server (its client_id is unknown)" in text(page)


def test_mismatched_redirect_uri_gets_an_error_page_not_a_redirect(bridge):
    browser = bridge.browser()
    for uri in ("https://evil.example/cb", "https://app.example/cb/", "https://app.example/cb?x=1"):
        page = browser.get(url(redirect_uri=uri))
        assert page.code == 400 and page.header("Location") is None
        assert 'id="error">invalid_request' in text(page)
    # any loopback port only for a public client, and only on the registered path
    page = browser.get(url(client_id="native", redirect_uri="http://127.0.0.1:9999/elsewhere"))
    assert page.code == 400 and page.header("Location") is None
    page = browser.get(url(client_id="local", redirect_uri="http://127.0.0.1:9999/cb"))
    assert page.code == 400 and page.header("Location") is None


def test_an_error_page_escapes_what_the_request_said(bridge):
    page = bridge.browser().get(url(redirect_uri="https://evil.example/<script>alert(1)</script>"))
    assert page.code == 400 and page.header("Location") is None
    assert "<script>" not in text(page) and "&lt;script&gt;" in text(page)


def test_a_redirect_uri_with_a_quote_gets_an_error_page_not_a_503(bridge):
    with capturedLogs() as events:
        page = bridge.browser().get(url(redirect_uri='https://evil.example/"'))
    assert page.code == 400 and page.header("Location") is None
    assert 'id="error">invalid_request' in text(page)
    assert [e["log_format"] for e in events] == ["Authorization refused with a page: {error}: {description}"]
    assert not any(e.get("log_failure") for e in events)


@pytest.mark.parametrize("redirect_uri", [
    "http://evil.example\\@127.0.0.1:5000/callback", "http://evil.example%5C@127.0.0.1:5000/callback",
    "http://evil.example@127.0.0.1:5000/callback", "http://evil.example%09@127.0.0.1:5000/callback",
])
def test_a_loopback_redirect_a_browser_would_read_as_another_host_gets_an_error_page(bridge, redirect_uri):
    """The code would go to evil.example, whose owner redeems it with their own verifier: with
    remembered consent not even a page would be shown (see test_browser.py for Chromium)."""
    browser = bridge.browser()  # signed in, and alice's consent to the app remembered
    good = login_and_consent(browser, url(client_id="native", redirect_uri="http://127.0.0.1:5000/callback"),
                             "alice", PASSWORD)
    assert "code" in redirect_params(good)
    page = browser.get(url(client_id="native", redirect_uri=redirect_uri))
    assert page.code == 400 and page.header("Location") is None
    assert 'id="error">invalid_request' in text(page)


def test_disallowed_scope_redirects_with_invalid_scope(bridge):
    params = redirect_params(bridge.browser().get(url(scope="imap metrics")))
    assert params["error"] == "invalid_scope" and params["state"] == "st-123" and params["iss"] == ISSUER


def test_public_client_without_pkce(bridge):
    params = redirect_params(bridge.browser().get(url(client_id="native", redirect_uri="http://127.0.0.1:5000/callback",
                                                      challenge=None)))
    assert params["error"] == "invalid_request"


def test_plain_pkce_is_refused(bridge):
    verifier, _ = pkce_pair()
    page = bridge.browser().get(url(challenge=None, code_challenge=verifier, code_challenge_method="plain"))
    assert redirect_params(page)["error"] == "invalid_request"


def test_unsupported_response_type(bridge):
    params = redirect_params(bridge.browser().get(url(response_type="token")))
    assert params["error"] == "unsupported_response_type"


# -- what every page carries, and what is counted ---------------------------------------------------

def test_pages_refuse_framing(bridge):
    browser, consent = logged_in(bridge, url())
    pages = {
        "login": bridge.browser().get(url()),
        "consent": consent,
        "error": browser.get(url(client_id="no-such-client")),
        "form expired": browser.post(url(), data={"step": "login"}),
        "logout": browser.get("/logout"),
        "redirect": browser.get(url(response_type="token")),
    }
    for name, page in pages.items():
        assert page.header("X-Frame-Options") == "DENY", name
        assert "frame-ancestors 'none'" in page.header("Content-Security-Policy"), name
        assert page.header("X-Content-Type-Options") == "nosniff", name
        assert page.header("Referrer-Policy") == "no-referrer", name  # a code in a URL goes nowhere else


def test_authorizations_are_counted_by_outcome(bridge):
    login_and_consent(bridge.browser(), url(), "alice", PASSWORD)  # asklogin, askconsent, redirect
    bridge.browser().get(url(client_id="no-such-client"))         # errorpage
    bridge.browser().get(url(response_type="token"))              # redirect (with an error)
    logged_in(bridge, url(), "alice", "wrong")                    # asklogin twice (the form, the failure)
    counted = {outcome: bridge.count("bearerbridge_authorizations_total", outcome=outcome)
               for outcome in ("asklogin", "askconsent", "redirect", "errorpage")}
    assert counted == {"asklogin": 3, "askconsent": 1, "redirect": 2, "errorpage": 1}
    assert bridge.count("bearerbridge_logins_total", result="ok") == 1
    assert bridge.count("bearerbridge_logins_total", result="failed") == 1


# -- scopes only the operator grants --------------------------------------------------------------

def test_no_user_can_grant_an_operator_scope_even_to_a_client_registered_for_it(bridge):
    with bridge.store.transaction():
        bridge.store.add_client(Client("greedy", "Greedy App", (CB,), "imap metrics", CODE_GRANT, public=False), "s")
    for scope in ("imap metrics", None):  # asked for, or the registered scopes by default
        params = redirect_params(bridge.browser().get(url(client_id="greedy", scope=scope)))
        assert params["error"] == "invalid_scope" and "metrics" in params["error_description"]
    assert "code" in redirect_params(login_and_consent(bridge.browser(), url(client_id="greedy", scope="imap"),
                                                       "alice", PASSWORD))


# -- a planted CSRF cookie ---------------------------------------------------------------------------

def test_a_planted_csrf_cookie_is_replaced_not_trusted(bridge):
    """A cookie set by a sibling subdomain, say, holding a `|`, once let one binding's MAC verify
    for another: only the form of cookie bearerbridge issues is used."""
    browser = bridge.browser()
    planted = "x|1|client_id=web"
    page = browser.get(url(), headers={"Cookie": f"bb_csrf={planted}"})
    assert "bb_csrf=" in set_cookies(page) and planted not in set_cookies(page)
    action, fields = form_of(page)
    answer = browser.post(action, data={**fields, "username": "alice", "password": PASSWORD},
                          headers={"Cookie": f"bb_csrf={planted}"})
    assert answer.code == 400 and "The form has expired" in text(answer)


# -- sessions live at the server -------------------------------------------------------------------

def session_cookie(answer: Answer) -> str:
    cookie = next(c for c in (answer.headers.getRawHeaders("Set-Cookie") or []) if c.startswith("bb_session="))
    return cookie.split(";", 1)[0]


def signed_in_browser(bridge: Bridge) -> tuple[Http, str]:
    """A browser that has signed in, and its session cookie (`bb_session=...`), as a thief would copy it."""
    browser, page = logged_in(bridge, url())
    assert form_of(page)[1]["step"] == "consent"
    return browser, session_cookie(page)


def asks_to_sign_in(bridge: Bridge, cookie: str) -> bool:
    """Whether another browser holding only this session cookie is asked to sign in."""
    page = bridge.browser().get(url(), headers={"Cookie": cookie})
    return form_of(page)[1]["step"] == "login"


def test_a_copied_session_cookie_works_until_the_session_ends_at_logout(bridge):
    browser, cookie = signed_in_browser(bridge)
    assert not asks_to_sign_in(bridge, cookie)  # the copy works while the session lives
    action, fields = form_of(browser.get("/logout"))
    assert browser.post(action, data=fields).code == 200
    assert asks_to_sign_in(bridge, cookie)


def test_a_password_change_and_disabling_the_user_end_every_session(bridge):
    _, first = signed_in_browser(bridge)
    _, second = signed_in_browser(bridge)
    with bridge.store.transaction():
        assert bridge.store.set_password("alice", cheap_password_hash("another one")) == 2
    assert asks_to_sign_in(bridge, first) and asks_to_sign_in(bridge, second)
    _, third = signed_in_browser_with(bridge, "another one")
    with bridge.store.transaction():
        assert bridge.store.set_disabled("alice", True)[0] == 1
        bridge.store.set_disabled("alice", False)
    assert asks_to_sign_in(bridge, third)


def signed_in_browser_with(bridge: Bridge, password: str) -> tuple[Http, str]:
    browser, page = logged_in(bridge, url(), password=password)
    return browser, session_cookie(page)


def test_a_session_cookie_that_is_not_one_is_no_session(bridge):
    for cookie in ("bb_session=", "bb_session=1.1700000000.forged", "bb_session=" + "A" * 43):
        assert asks_to_sign_in(bridge, cookie), cookie

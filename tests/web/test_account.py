"""/account in process, over the whole HTTP tree and a real SQLite store: signing in to it, the
connected apps with their scopes and last uses, revoking a grant (its tokens stop working and the
next authorization asks again), the sessions list and signing out, changing the password, and
every form's CSRF token."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import token_uses

from ..fakes import (
    CODE_GRANTS,
    PASSWORD,
    Bridge,
    Http,
    NewUser,
    cheap_password_hash,
    code_grant,
    form_of,
    sqlite_bridge,
)
from ..support import authorize_url, pkce_pair

CB = "https://mail.example/cb"
# The clients and users of /account's tests (tests/web/test_account_mail.py's too).
CLIENTS = (
    Client("mail", "Mail App", (CB,), "imap smtp", CODE_GRANTS, public=False, website="https://mail.example/"),
    Client("chat", "Chat App", (CB,), "xmpp", CODE_GRANTS, public=False),
    Client("imapd", "IMAP server", (), "imap", ("client_credentials",), public=False, resource_server=True),
)
ALICE = NewUser("alice", "alice@example.org")


@pytest.fixture
def bridge(tmp_path) -> Iterator[Bridge]:
    with sqlite_bridge(tmp_path / "x.db", CLIENTS, [ALICE, NewUser("bob")]) as bridge:
        yield bridge


def granted(bridge: Bridge, browser: Http, client_id: str, scope: str, username: str = "alice") -> dict:
    """`browser` approves `client_id` for `scope`; the tokens the app got."""
    return code_grant(bridge, browser, client_id, CB, scope, username)


def account(browser: Http) -> str:
    page = browser.get("/account")
    assert page.code == 200, page.body
    return page.body.decode()


def post(browser: Http, **fields: str):
    _, form = form_of(browser.get("/account"))  # every form of the page carries the same token
    return browser.post("/account", data={"csrf": form["csrf"], **fields})


def app_of(page: str, client_id: str) -> str:
    """The part of the account page about one app."""
    start = page.index(f'id="app-{client_id}"')
    return page[start:page.index("</article>", start)]


def active(bridge: Bridge, token: str) -> bool:
    return json.loads(bridge.browser().post("/introspect", data={
        "token": token, "client_id": "imapd", "client_secret": "imapd-secret"}).body)["active"]


def signed_in_browser(bridge: Bridge, username: str = "alice") -> Http:
    browser = bridge.browser()
    action, fields = form_of(browser.get("/account"))
    answer = browser.post(action, data={**fields, "username": username, "password": PASSWORD})
    assert answer.code == 303 and answer.header("Location") == "/account", answer.body
    return browser


def test_account_asks_for_a_sign_in_and_then_shows_the_user(bridge):
    browser = bridge.browser()
    page = browser.get("/account")
    assert page.code == 200 and "Sign in to see and manage your account" in page.body.decode()
    action, fields = form_of(page)
    failed = browser.post(action, data={**fields, "username": "alice", "password": "wrong"})
    assert failed.code == 401 and "Wrong username or password" in failed.body.decode()
    browser = signed_in_browser(bridge)
    assert 'id="account-user">alice</strong> (alice@example.org)' in account(browser)
    assert 'id="no-apps"' in account(browser)


def test_connected_apps_show_the_scopes_in_words_and_the_last_use_per_service(bridge):
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap smtp")
    granted(bridge, browser, "chat", "xmpp")
    with bridge.store.transaction():
        family = bridge.store.find_access_token(tokens["access_token"]).family
        bridge.store._db.execute(token_uses.insert(), [
            {"family": family, "service": "imap", "last_used_at": 1_767_225_600, "address": "192.0.2.7"},
            {"family": family, "service": "smtp", "last_used_at": 1_767_229_200, "address": None}])
    page = account(browser)
    assert page.index('id="app-chat"') < page.index('id="app-mail"')  # the newest grant first
    mail = app_of(page, "mail")
    assert "Mail App" in mail and 'href="https://mail.example/"' in mail
    assert "Read and manage your mail (IMAP)" in mail and "Send mail as you (SMTP)" in mail
    assert "<strong>imap</strong> 2026-01-01 00:00 UTC from 192.0.2.7" in mail
    assert "<strong>smtp</strong> 2026-01-01 01:00 UTC</li>" in mail
    chat = app_of(page, "chat")
    assert "Chat as you (XMPP)" in chat and "Not used yet." in chat
    assert 'id="app-mail"' not in account(signed_in_browser(bridge, "bob"))  # each user sees their own


def test_revoking_ends_the_grants_tokens_and_the_next_authorization_asks_again(bridge):
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap")
    assert active(bridge, tokens["access_token"])
    answer = post(browser, step="revoke", client_id="mail")
    assert answer.code == 200 and 'id="notice"' in answer.body.decode() and 'id="app-mail"' not in answer.body.decode()
    assert not active(bridge, tokens["access_token"])
    refreshed = bridge.browser().post("/token", data={"grant_type": "refresh_token", "client_id": "mail",
                                                      "client_secret": "mail-secret",
                                                      "refresh_token": tokens["refresh_token"]})
    assert refreshed.code == 400
    _, challenge = pkce_pair()
    again = browser.get(authorize_url("", "mail", CB, challenge, "imap"))
    assert form_of(again)[1]["step"] == "consent"  # the consent was forgotten
    [event] = bridge.audit.of("grant_revoked")
    assert (event["user"], event["client_id"], event["revoked"], event["by"]) == ("alice", "mail", 1, "user")
    assert post(browser, step="revoke", client_id="mail").code == 400  # nothing left to revoke


def test_a_user_cannot_revoke_another_users_grant(bridge):
    alice = signed_in_browser(bridge)
    tokens = granted(bridge, alice, "mail", "imap")
    bob = signed_in_browser(bridge, "bob")
    assert post(bob, step="revoke", client_id="mail").code == 400
    assert active(bridge, tokens["access_token"])


def test_sessions_are_listed_and_signing_out_others_or_everywhere_ends_them(bridge):
    first, second, third = (signed_in_browser(bridge) for _ in range(3))
    page = account(first)
    assert page.count("<li><strong>This browser</strong>") == 1 and page.count("<li>A browser") == 2
    answer = post(first, step="sign_out_others")
    assert "Signed out 2 other browser session(s)." in answer.body.decode()
    assert "Sign in to see" in second.get("/account").body.decode()
    assert "Sign in to see" not in first.get("/account").body.decode()
    done = post(first, step="sign_out_everywhere")
    assert done.code == 200 and 'id="signed-out"' in done.body.decode()
    assert "bb_session=;" in "\n".join(done.headers.getRawHeaders("Set-Cookie") or [])
    assert "Sign in to see" in first.get("/account").body.decode() and third


def test_changing_the_password_checks_the_current_one_and_ends_the_other_sessions(bridge):
    browser, other = signed_in_browser(bridge), signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap")
    short = post(browser, step="password", current_password=PASSWORD, new_password="short", repeat_password="short")
    assert short.code == 400 and "at least 8 characters" in short.body.decode()
    differ = post(browser, step="password", current_password=PASSWORD, new_password="a new passphrase",
                  repeat_password="another passphrase")
    assert differ.code == 400 and "differ" in differ.body.decode()
    wrong = post(browser, step="password", current_password="wrong", new_password="a new passphrase",
                 repeat_password="a new passphrase")
    assert wrong.code == 400 and "current password is wrong" in wrong.body.decode()
    changed = post(browser, step="password", current_password=PASSWORD, new_password="a new passphrase",
                   repeat_password="a new passphrase")
    assert changed.code == 200 and "Password changed" in changed.body.decode() and "(1 session(s))" in \
        changed.body.decode()
    assert "Sign in to see" not in browser.get("/account").body.decode()  # this browser stays signed in
    assert "Sign in to see" in other.get("/account").body.decode()
    assert active(bridge, tokens["access_token"])  # apps keep their access
    with bridge.store.transaction():
        assert bridge.store.password_hash("alice")[1] != cheap_password_hash(PASSWORD)
    [event] = bridge.audit.of("password_changed")
    assert event["user"] == "alice" and event["sessions_ended"] == 2


@pytest.mark.parametrize("step", ["revoke", "sign_out_others", "sign_out_everywhere", "password"])
def test_every_form_needs_its_csrf_token(bridge, step):
    browser = signed_in_browser(bridge)
    granted(bridge, browser, "mail", "imap")
    fields = {"step": step, "client_id": "mail", "current_password": PASSWORD, "new_password": "a new passphrase",
              "repeat_password": "a new passphrase"}
    for csrf in (None, "forged", form_of(signed_in_browser(bridge).get("/account"))[1]["csrf"]):
        answer = browser.post("/account", data={**fields, **({"csrf": csrf} if csrf else {})})
        assert answer.code == 400 and "The form has expired" in answer.body.decode(), csrf
    assert 'id="app-mail"' in account(browser) and "Sign in to see" not in account(browser)

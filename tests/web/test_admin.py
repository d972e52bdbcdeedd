"""/admin in process, over the whole HTTP tree and a real SQLite store: only a signed-in admin gets
past its gate (403 for anyone else, on every address, GET and POST), every form needs its CSRF
token, a client registered there completes a real code grant, rotating a secret refuses the old
one, deleting asks first, users are added, disabled (their live Dovecot sessions ended, whatever
Dovecot answers), reset and signed out; each change an `admin` audit event with the admin as the
actor and where they were."""

from __future__ import annotations

import html
import json
import time
from html.parser import HTMLParser

import pyotp
import pytest
import pytest_twisted

from bearerbridge.storage.models import Client
from bearerbridge.storage.schema import recovery_codes, totp_secrets
from bearerbridge.web.admin import ID

from ..fakes import (
    Answer,
    Bridge,
    Http,
    NewUser,
    cheap_password_hash,
    form_of,
    login_and_consent,
    redirect_params,
    sqlite_store,
)
from ..support import authorize_url, pkce_pair
from .test_account import ALICE, active, granted, signed_in_browser
from .test_account_mail import (
    DOVECOT_FAILURES,
    TIMEOUT,
    answered,
    bridge_over,
    failing_bridge,
    not_ended,
    used_from,
)
from .test_two_factor import codes_of

CB = "https://app.example/cb"
PASSWORD = "correct horse battery"
ADDRESS = "127.0.0.1"  # where StubTreq's requests come from


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        code = ("authorization_code", "refresh_token")
        store.add_client(Client("mail", "Mail App", (CB,), "imap smtp", code, public=False), "mail-secret")
        store.add_client(Client("imapd", "IMAP server", (), "imap", ("client_credentials",), public=False,
                                resource_server=True), "imapd-secret")
        store.add_client(Client("native", "Phone App", ("http://127.0.0.1/cb",), "imap", code, public=True), None)
        store.add_user("root", "root@example.org", cheap_password_hash(PASSWORD), is_admin=True)
        store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
    yield Bridge.over(store)
    store.engine.dispose()


# -- a browser's part ---------------------------------------------------------------------------------

class _Form(HTMLParser):
    """What a browser would send for the form of `form_id`: its inputs, checked boxes and radios,
    textareas and selected options."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.fields = form_id, False, {}
        self._textarea: str | None = None
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        elif not self.inside or not a.get("name") and tag != "option":
            return
        elif tag == "input" and (a.get("type") not in ("checkbox", "radio") or "checked" in a):
            self.fields[a["name"]] = a.get("value", "on")
        elif tag == "textarea":
            self._textarea = a["name"]
            self.fields[a["name"]] = ""
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and ("selected" in a or self._select not in self.fields):
            self._option = True

    def handle_data(self, data):
        if self._textarea:
            self.fields[self._textarea] += data
        elif self._select and getattr(self, "_option", False):
            self.fields[self._select] = data
            self._option = False

    def handle_endtag(self, tag):
        if tag == "textarea":
            self._textarea = None
        elif tag == "select":
            self._select = None
        elif tag == "form":
            self.inside = False


def filled(page: str, form_id: str, **changes: str | None) -> dict[str, str]:
    """The form as a browser would send it, with fields changed (None: unchecked, left out)."""
    parser = _Form(form_id)
    parser.feed(page)
    fields = {**parser.fields, **changes}
    return {k: v for k, v in fields.items() if v is not None}


def signed_in(bridge: Bridge, username: str = "root", path: str = "/admin") -> Http:
    """A browser signed in as `username` through /admin's own sign-in form."""
    browser = bridge.browser()
    page = browser.get(path)
    assert page.code == 200 and 'id="sign-in"' in page.body.decode(), page.body
    action, fields = form_of(page)
    assert action == path
    answer = browser.post(action, data={**fields, "username": username, "password": PASSWORD})
    assert answer.code == 303 and answer.header("Location") == path, answer.body
    return browser


def body(browser: Http, path: str, status: int = 200) -> str:
    page = browser.get(path)
    assert page.code == status, (page.code, page.body[:800])
    return page.body.decode()


def csrf_of(browser: Http) -> str:
    return form_of(browser.get("/admin/clients/new"))[1]["csrf"]


def post(browser: Http, path: str, **fields: str):
    return browser.post(path, data={"csrf": csrf_of(browser), **fields})


def text_of(page: str, element_id: str) -> str:
    start = page.index(">", page.index(f'id="{element_id}"')) + 1
    return page[start:page.index("<", start)]


def admin_events(bridge: Bridge, action: str) -> list[dict]:
    return [e for e in bridge.audit.of("admin") if e.get("action") == action]


def user_id(bridge: Bridge, name: str) -> int:
    with bridge.store.transaction():
        return bridge.store.get_user_by_name(name).id


def introspected(bridge: Bridge, token: str) -> bool:
    return json.loads(bridge.browser().post("/introspect", data={
        "token": token, "client_id": "imapd", "client_secret": "imapd-secret"}).body)["active"]


def code_grant(bridge: Bridge, browser: Http, client_id: str, secret: str | None, scope: str = "imap",
               redirect_uri: str = CB, username: str = "alice") -> dict:
    """`browser` signs in as `username` and approves; the app exchanges the code: its token answer."""
    verifier, challenge = pkce_pair()
    answer = login_and_consent(browser, authorize_url("", client_id, redirect_uri, challenge, scope), username,
                               PASSWORD)
    exchange = {"grant_type": "authorization_code", "code": redirect_params(answer)["code"],
                "redirect_uri": redirect_uri, "code_verifier": verifier, "client_id": client_id,
                **({"client_secret": secret} if secret else {})}
    return json.loads(bridge.browser().post("/token", data=exchange).body)


def every_address(bridge: Bridge, method: bytes) -> list[str]:
    """Every address /admin serves to `method` (its routes, with a client's and a user's id), and
    one it does not."""
    admin = bridge.root.children[b"admin"]
    paths = ["/admin/" + "/".join(
        ("mail" if route.path[0] == "clients" else str(user_id(bridge, "alice"))) if part == ID else part
        for part in route.path) for route in admin.routes if route.method == method]
    return [p.rstrip("/") for p in paths] + ["/admin/nothing-here"]


# -- the gate ---------------------------------------------------------------------------------------

def test_without_a_session_an_admin_page_asks_for_a_sign_in_then_shows_the_page_asked_for(bridge):
    path = f"/admin/users/{user_id(bridge, 'alice')}"
    browser = signed_in(bridge, path=path)
    page = body(browser, path)
    assert 'id="admin-user">root</strong>' in page and "<h2>alice" in page
    front = body(browser, "/admin")
    assert 'id="client-mail"' in front and 'id="client-native"' in front
    assert "authorization_code, refresh_token" in front
    assert f'id="user-{user_id(bridge, "alice")}"' in front
    failed = bridge.browser()
    login = failed.get("/admin")
    assert "with an administrator's account" in login.body.decode() and "manage your account" not in login.body.decode()
    action, fields = form_of(login)
    assert failed.post(action, data={**fields, "username": "root", "password": "wrong"}).code == 401


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_a_user_who_is_not_an_admin_gets_403_on_every_admin_address(bridge, method):
    browser = signed_in(bridge, "alice")
    csrf = form_of(browser.get("/account"))[1]["csrf"]  # a token of hers, for another page
    for path in every_address(bridge, method):
        answer = browser.request(method.decode(), path, data={"csrf": csrf, "step": "disable", "name": "x",
                                                              "kind": "public"})
        assert answer.code == 403 and 'id="forbidden"' in answer.body.decode(), (path, answer.code)
    with bridge.store.transaction():
        assert bridge.store.get_client("mail") is not None and not bridge.store.get_user_by_name("alice").disabled
    if method == b"POST":
        refused = bridge.audit.of("admin")
        assert len(refused) == len(every_address(bridge, b"POST"))
        assert {(e["actor"], e["outcome"], e["reason"], e["address"]) for e in refused} == {
            ("alice", "refused", "not an admin", ADDRESS)}
        assert "client delete" in {e.get("action") for e in refused}


def test_a_disabled_admin_is_signed_out_and_an_unknown_page_is_404(bridge):
    browser = signed_in(bridge)
    assert browser.get("/admin/clients/nobody").code == 404
    assert browser.get("/admin/users/99999").code == 404
    assert browser.get("/admin/nothing-here").code == 404
    assert browser.post("/admin", data={"csrf": csrf_of(browser)}).code == 405
    assert browser.request("HEAD", "/admin/clients/mail").code == 200
    with bridge.store.transaction():
        bridge.store.set_disabled("root", True)
    assert 'id="sign-in"' in body(browser, "/admin")


@pytest.mark.parametrize("path", ["/admin/clients/new", "/admin/clients/mail/secret", "/admin/clients/mail/delete",
                                  "/admin/users/new", "/admin/users/{alice}"])
def test_every_admin_form_needs_its_csrf_token(bridge, path):
    path = path.format(alice=user_id(bridge, "alice"))
    browser = signed_in(bridge)
    other_session = csrf_of(signed_in(bridge))  # the same admin, in another browser
    fields = {"step": "disable", "name": "evil", "redirect_uris": CB, "scope:imap": "on", "grant:client_credentials":
              "on", "password": PASSWORD, "repeat_password": PASSWORD}
    for csrf in (None, "forged", other_session):
        answer = browser.post(path, data={**fields, **({"csrf": csrf} if csrf else {})})
        assert answer.code == 400 and "The form has expired" in answer.body.decode(), csrf
    with bridge.store.transaction():
        assert bridge.store.get_client("mail").check_client_secret("mail-secret")
        assert [c.name for c in bridge.store.list_clients()] == ["IMAP server", "Mail App", "Phone App"]
        assert [u.username for u in bridge.store.list_users()] == ["alice", "root"]
        assert not bridge.store.get_user_by_name("alice").disabled
    assert bridge.audit.of("admin") == []


# -- clients ------------------------------------------------------------------------------------------

def test_a_client_registered_on_the_admin_page_completes_a_code_grant(bridge):
    admin = signed_in(bridge)
    form = body(admin, "/admin/clients/new")
    assert 'name="scope:metrics"' in form and 'id="scope-metrics">' in form  # operator scopes offered, unchecked
    fields = filled(form, "client-form", name="Webmail", redirect_uris=f"{CB}\r\nhttps://app.example/other\r\n",
                    **{"scope:openid": None, "scope:profile": None, "scope:email": None})
    assert fields["kind"] == "confidential" and fields["pkce"] == "on" and fields["id_token_alg"] == "ES256"
    created = admin.post("/admin/clients/new", data=fields)
    page = created.body.decode()
    assert created.code == 200 and "shown only this once" in page
    client_id, secret = text_of(page, "client-id"), text_of(page, "client-secret")
    with bridge.store.transaction():
        client = bridge.store.get_client(client_id)
    assert client.name == "Webmail" and client.redirect_uris == (CB, "https://app.example/other")
    assert client.grant_types == ("authorization_code", "refresh_token") and client.pkce_required
    assert "openid" not in client.scope.split() and "metrics" not in client.scope.split()

    tokens = code_grant(bridge, bridge.browser(), client_id, secret)
    assert tokens["scope"] == "imap" and introspected(bridge, tokens["access_token"])
    shown = body(admin, f"/admin/clients/{client_id}")
    assert text_of(shown, "granted") == "1" and secret not in shown

    [event] = admin_events(bridge, "client create")
    assert (event["actor"], event["address"], event["via"], event["outcome"]) == ("root", ADDRESS, "web", "done")
    assert event["client_id"] == client_id and event["client_name"] == "Webmail" and event["public"] is False
    assert secret not in json.dumps(bridge.audit.events)


def test_a_public_client_gets_no_secret_and_proves_itself_with_pkce(bridge):
    admin = signed_in(bridge)
    fields = filled(body(admin, "/admin/clients/new"), "client-form", name="Desktop", kind="public",
                    redirect_uris="http://127.0.0.1/callback")
    page = admin.post("/admin/clients/new", data=fields).body.decode()
    assert 'id="client-secret"' not in page and "a public client proves" in page
    tokens = code_grant(bridge, bridge.browser(), text_of(page, "client-id"), None,
                        redirect_uri="http://127.0.0.1:5123/callback")
    assert "access_token" in tokens
    rotate = post(admin, f"/admin/clients/{text_of(page, 'client-id')}/secret")
    assert rotate.code == 400 and "no secret to rotate" in rotate.body.decode()


@pytest.mark.parametrize("changes, reason", [
    ({"redirect_uris": "http://app.example/cb"}, "plain http is allowed only to"),
    ({"redirect_uris": "https://app.example/cb#x"}, "no fragment"),
    ({"redirect_uris": ""}, "needs at least one redirect URI"),
    ({"kind": "public", "grant:client_credentials": "on"}, "a public client cannot use client_credentials"),
    ({"kind": "public", "resource_server": "on"}, "cannot be a resource server"),
    ({"kind": "public", "pkce": None}, "must use PKCE"),
    ({"scope:imap": None, "scope:smtp": None, "scope:xmpp": None, "scope:openid": None, "scope:profile": None,
      "scope:email": None, "scope:webdav:read": None, "scope:webdav:write": None}, "choose at least one scope"),
    ({"scope:root": "on"}, "unknown scope(s) root"),
    ({"grant:implicit": "on"}, "unknown grant(s) implicit"),
    ({"name": "  "}, "needs a name"),
    ({"id_token_alg": "none"}, "signed with one of ES256, RS256"),
])
def test_a_registration_is_refused_for_what_the_command_line_refuses(bridge, changes, reason):
    admin = signed_in(bridge)
    fields = filled(body(admin, "/admin/clients/new"), "client-form", name="Webmail", redirect_uris=CB)
    for name in [k for k, v in changes.items() if v is None]:
        fields.pop(name)
    answer = admin.post("/admin/clients/new", data={**fields, **{k: v for k, v in changes.items() if v is not None}})
    page = answer.body.decode()
    assert answer.code == 400 and reason.lower() in page.lower() and 'id="client-form"' in page, page[:2000]
    assert changes.get("name", "Webmail").strip() in page  # the form is shown again as it was filled in
    with bridge.store.transaction():
        assert len(bridge.store.list_clients()) == 3
    event = admin_events(bridge, "client create")[-1]
    assert event["outcome"] == "refused" and reason.lower() in event["reason"].lower() and event["actor"] == "root"


def test_rotating_a_secret_refuses_the_old_one_and_accepts_the_new_one(bridge):
    admin = signed_in(bridge)

    def introspect_with(secret: str) -> int:
        return bridge.browser().post("/introspect", data={"token": "x", "client_id": "imapd",
                                                          "client_secret": secret}).code
    assert introspect_with("imapd-secret") == 200
    page = body(admin, "/admin/clients/imapd")
    assert 'id="rotate"' in page and "resource server" in page.lower()
    rotated = post(admin, "/admin/clients/imapd/secret")
    new = text_of(rotated.body.decode(), "client-secret")
    assert rotated.code == 200 and "The old secret no longer works" in rotated.body.decode()
    assert introspect_with("imapd-secret") == 401 and introspect_with(new) == 200
    [event] = admin_events(bridge, "client rotate")
    assert (event["client_id"], event["client_name"], event["actor"]) == ("imapd", "IMAP server", "root")
    assert new not in json.dumps(bridge.audit.events)
    assert post(admin, "/admin/clients/nobody/secret").code == 404


def test_deleting_a_client_asks_first_then_ends_its_tokens(bridge):
    tokens = code_grant(bridge, bridge.browser(), "mail", "mail-secret")
    admin = signed_in(bridge)
    assert 'href="/admin/clients/mail/delete"' in body(admin, "/admin/clients/mail")
    asking = body(admin, "/admin/clients/mail/delete")
    assert "Delete Mail App?" in asking and "its 1 user(s)" in asking and 'id="confirm-delete"' in asking
    with bridge.store.transaction():
        assert bridge.store.get_client("mail") is not None  # asking deleted nothing
    done = post(admin, "/admin/clients/mail/delete")
    assert done.code == 200 and "Deleted Mail App" in done.body.decode()
    assert 'id="client-mail"' not in done.body.decode()
    assert not introspected(bridge, tokens["access_token"])
    [event] = admin_events(bridge, "client delete")
    assert (event["client_id"], event["client_name"], event["address"]) == ("mail", "Mail App", ADDRESS)
    assert admin.get("/admin/clients/mail").code == 404 and post(admin, "/admin/clients/mail/delete").code == 404


# -- users --------------------------------------------------------------------------------------------

def test_adding_a_user_who_can_then_sign_in_and_an_admin_who_can_use_these_pages(bridge):
    admin = signed_in(bridge)
    form = body(admin, "/admin/users/new")
    fields = filled(form, "user-form", name="carol", email="carol@example.org", password="a long passphrase",
                    repeat_password="a long passphrase")
    added = admin.post("/admin/users/new", data=fields)
    assert added.code == 200 and "Added carol." in added.body.decode() and "<h2>carol" in added.body.decode()
    carol = bridge.browser()
    action, login = form_of(carol.get("/account"))
    assert carol.post(action, data={**login, "username": "carol", "password": "a long passphrase"}).code == 303
    assert carol.get("/admin").code == 403

    dave = filled(form, "user-form", name="dave", password=PASSWORD, repeat_password=PASSWORD, is_admin="on")
    assert "Added dave, an admin." in admin.post("/admin/users/new", data=dave).body.decode()
    assert 'id="admin-user">dave<' in body(signed_in(bridge, "dave"), "/admin")
    assert [(e["user"], e["is_admin"], e["actor"], e["outcome"]) for e in admin_events(bridge, "user add")] == [
        ("carol", False, "root", "done"), ("dave", True, "root", "done")]
    assert "a long passphrase" not in json.dumps(bridge.audit.events)


@pytest.mark.parametrize("changes, reason", [
    ({"name": "ALICE"}, "exists already"),
    ({"email": "ALICE@example.org"}, "taken by user 'alice'"),
    ({"name": "two words"}, "spaces"),
    ({"email": "x" * 250 + "@example.org"}, "at most 255 characters"),
    ({"password": "short", "repeat_password": "short"}, "at least 8 characters"),
    ({"repeat_password": "another passphrase"}, "differ"),
])
def test_adding_a_user_is_refused_with_the_reason(bridge, changes, reason):
    admin = signed_in(bridge)
    fields = {"name": "carol", "email": "", "password": PASSWORD, "repeat_password": PASSWORD, **changes}
    answer = post(admin, "/admin/users/new", **fields)
    assert answer.code == 400 and reason in html.unescape(answer.body.decode()) and 'id="user-form"' in \
        answer.body.decode()
    assert admin_events(bridge, "user add")[-1]["outcome"] == "refused"


def test_disabling_a_user_ends_their_sessions_and_tokens_and_enabling_brings_none_back(bridge):
    alice = bridge.browser()
    tokens = code_grant(bridge, alice, "mail", "mail-secret")
    admin = signed_in(bridge)
    path = f"/admin/users/{user_id(bridge, 'alice')}"
    grants = body(admin, path)
    assert 'id="grant-mail"' in grants and "<code" in grants and "imap</code>" in grants
    disabled = post(admin, path, step="disable").body.decode()
    assert "Disabled alice: 1 browser session(s) ended and 1 token(s) revoked" in disabled
    assert 'id="enable"' in disabled and "disabled:" in disabled
    assert not introspected(bridge, tokens["access_token"])
    assert "Sign in to" in alice.get("/account").body.decode()
    assert "Enabled alice" in post(admin, path, step="enable").body.decode()
    assert not introspected(bridge, tokens["access_token"])
    myself = post(admin, f"/admin/users/{user_id(bridge, 'root')}", step="disable")
    assert myself.code == 400 and "cannot disable yourself" in myself.body.decode()
    assert post(admin, path, step="explode").code == 400
    assert [(e["action"], e["user"], e.get("sessions_ended"), e.get("revoked")) for e in bridge.audit.of("admin")] == [
        ("user disable", "alice", 1, 1), ("user enable", "alice", None, None)]


def test_resetting_a_users_second_factor(bridge):
    alice = user_id(bridge, "alice")
    with bridge.store.transaction():
        bridge.store._db.execute(totp_secrets.insert().values(user_id=alice, sealed="x", confirmed_at=1))
        bridge.store._db.execute(recovery_codes.insert().values(code_digest="d1", user_id=alice))
    admin = signed_in(bridge)
    front = body(admin, "/admin")
    row = front[front.index(f'id="user-{alice}"'):]
    assert '<td data-label="Second factor">on</td>' in row[:row.index("</tr>")]
    page = body(admin, f"/admin/users/{alice}")
    assert text_of(page, "second-factor").startswith("on") and 'id="reset-second-factor"' in page
    reset = post(admin, f"/admin/users/{alice}", step="reset_second_factor").body.decode()
    assert "second factor is reset" in reset and text_of(reset, "second-factor") == "off"
    with bridge.store.transaction():
        assert bridge.store.second_factor_users() == set()
        assert bridge.store._db.execute(recovery_codes.select()).first() is None
    again = post(admin, f"/admin/users/{alice}", step="reset_second_factor")
    assert again.code == 400 and "has no second factor" in again.body.decode()
    [event] = admin_events(bridge, "user reset_second_factor")
    assert (event["user"], event["actor"], event["address"]) == ("alice", "root", ADDRESS)


def test_signing_a_user_out_everywhere_keeps_their_apps(bridge):
    first, second = bridge.browser(), bridge.browser()
    tokens = code_grant(bridge, first, "mail", "mail-secret")
    code_grant(bridge, second, "mail", "mail-secret")
    admin = signed_in(bridge)
    path = f"/admin/users/{user_id(bridge, 'alice')}"
    assert text_of(body(admin, path), "sessions") == "2"
    done = post(admin, path, step="sign_out").body.decode()
    assert "Signed alice out everywhere: 2 browser session(s) ended" in done and text_of(done, "sessions") == "0"
    for browser in (first, second):
        assert "Sign in to" in browser.get("/account").body.decode()
    assert introspected(bridge, tokens["access_token"])
    [event] = admin_events(bridge, "user end_sessions")
    assert (event["user"], event["sessions_ended"], event["actor"]) == ("alice", 2, "root")


def test_an_admin_with_two_factor_sign_in_gives_the_code_before_the_admin_pages(bridge):
    secret = pyotp.random_base32()
    with bridge.store.transaction():
        root = bridge.store.get_user_by_name("root").id
        bridge.store.begin_totp(root, secret)
    with bridge.store.transaction():
        assert bridge.store.confirm_totp(root, codes_of(secret)[-1], ["abcde-fghjk"])
    browser = bridge.browser()
    action, fields = form_of(browser.get("/admin/clients/new"))
    asked = browser.post(action, data={**fields, "username": "root", "password": PASSWORD})
    action, fields = form_of(asked)
    assert asked.code == 200 and fields["step"] == "second_factor" and action == "/admin/clients/new"
    assert 'id="sign-in"' in body(browser, "/admin")  # no session yet
    done = browser.post(action, data={**fields, "code": codes_of(secret)[0]})
    assert done.code == 303 and done.header("Location") == "/admin/clients/new"
    assert 'id="client-form"' in body(browser, "/admin/clients/new")
    assert bridge.audit.of("sign_in")[-1]["amr"] == ["pwd", "otp", "mfa"]


# -- disabling a user ends their live mail sessions (web/mail_kick.py) --------------------------------

@pytest.fixture
def mail_bridge(tmp_path, doveadm) -> Bridge:  # doveadm: tests/conftest.py's fake doveadm HTTP API
    """/account's clients, root (an admin) and alice, with [dovecot] asking the fake doveadm API."""
    with bridge_over(tmp_path, doveadm.url, users=(NewUser("root", is_admin=True), ALICE)) as made:
        yield made


async def disable(bridge: Bridge, admin: Http, username: str = "alice") -> Answer:
    """POST the user page's Disable button; the page, once Dovecot has answered (or the timeout passed)."""
    return await answered(admin, f"/admin/users/{user_id(bridge, username)}", {"csrf": csrf_of(admin),
                                                                               "step": "disable"})


def disabled_notice(answer: Answer) -> str:
    assert answer.code == 200, answer.body
    return html.unescape(text_of(answer.body.decode(), "notice"))


@pytest_twisted.ensureDeferred
async def test_disabling_a_user_ends_every_live_mail_session_of_theirs(mail_bridge, doveadm):
    alice = signed_in_browser(mail_bridge)
    tokens = granted(mail_bridge, alice, "mail", "imap")
    used_from(mail_bridge, tokens["access_token"], imap="192.0.2.7")  # no narrowing: every session ends
    doveadm.sessions = 3
    admin = signed_in(mail_bridge)
    said = disabled_notice(await disable(mail_bridge, admin))
    assert said == ("Disabled alice: 1 browser session(s) ended and 1 token(s) revoked. Ended 3 live mail "
                    "session(s) of alice. Enabling them again brings none of these back.")
    [seen] = doveadm.seen
    assert seen.commands == [["who", {"mask": ["alice"], "separate-connections": True}, "who0"],
                             ["kick", {"mask": ["alice"]}, "kick0"]]
    assert not active(mail_bridge, tokens["access_token"])
    [kick] = mail_bridge.audit.of("mail_kick")
    assert kick == {"user": "alice", "actor": "root", "address": ADDRESS, "by": "admin", "mail_user": "alice",
                    "outcome": "ended", "ended": 3}
    assert [e["user"] for e in admin_events(mail_bridge, "user disable")] == ["alice"]


@pytest_twisted.ensureDeferred
async def test_disabling_a_user_with_no_mail_session_open_says_so_and_enabling_or_refusing_asks_dovecot_nothing(
        mail_bridge, doveadm):
    doveadm.mode = "none"
    admin = signed_in(mail_bridge)
    said = disabled_notice(await disable(mail_bridge, admin))
    assert said == ("Disabled alice: 0 browser session(s) ended and 0 token(s) revoked. alice had no mail session "
                    "open. Enabling them again brings none of these back.")
    assert [kick["outcome"] for kick in mail_bridge.audit.of("mail_kick")] == ["none_open"]
    path = f"/admin/users/{user_id(mail_bridge, 'alice')}"
    assert "Enabled alice" in (await answered(admin, path, {"csrf": csrf_of(admin), "step": "enable"})).body.decode()
    myself = await disable(mail_bridge, admin, "root")
    assert myself.code == 400 and "cannot disable yourself" in myself.body.decode()
    assert len(doveadm.seen) == 1 and len(mail_bridge.audit.of("mail_kick")) == 1


@DOVECOT_FAILURES
@pytest_twisted.ensureDeferred
async def test_a_user_disabled_when_dovecot_cannot_end_their_sessions_stays_disabled_and_the_page_says_so(
        tmp_path, doveadm, case, outcome, reason):
    with failing_bridge(tmp_path, doveadm, case, users=(NewUser("root", is_admin=True), ALICE)) as bridge:
        alice = signed_in_browser(bridge)
        tokens = granted(bridge, alice, "mail", "imap")
        admin = signed_in(bridge)
        started = time.monotonic()
        said = disabled_notice(await disable(bridge, admin))
        assert time.monotonic() - started < TIMEOUT + 1
        assert said == (f"Disabled alice: 1 browser session(s) ended and 1 token(s) revoked. {not_ended(outcome)} "
                        "Enabling them again brings none of these back.")
        with bridge.store.transaction():
            assert bridge.store.get_user_by_name("alice").disabled
        assert not active(bridge, tokens["access_token"])
        assert "Sign in to" in alice.get("/account").body.decode()
        [kick] = bridge.audit.of("mail_kick")
        assert (kick["outcome"], kick["reason"], kick["ended"], kick["user"], kick["actor"]) == (
            outcome, reason, 0, "alice", "root")
        assert admin_events(bridge, "user disable")

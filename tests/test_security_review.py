"""Issue 9's items 5-11, 14-16 and 18 against a real `twistd bearerbridge`, as an attacker would
try them: over HTTP on loopback, through the Dovecot auth socket, and at the files the service
leaves on disk. (Items 1-4, 12, 13 and 17 have theirs in test_browser.py, test_hostile_clients.py,
test_database_outage.py and test_forward_auth.py; each item's fix is tested in process too.)
"""

from __future__ import annotations

import base64
import os
import socket
import stat
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from .support import (
    CliError,
    Service,
    authorize_url,
    exchange_code,
    form_fields,
    free_port,
    introspect,
    login_and_consent,
    pkce_pair,
    redirect_params,
    token_request,
    wait_for,
)

CB = "https://app.example/cb"
TIMEOUT = 10
# A revocation made by another process (the command line) reaches the service's memory of
# recent reads within [sasl] cache_ttl (1 s); past this, an answer is final.
SETTLED = 5
DEVICE_CODES = 2
CONFIGURED = """
[sasl]
listen = ["tcp:{port}:interface=127.0.0.1"]
[tokens]
device_codes_per_client = {codes}
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """A service of our own: a Dovecot socket (item 11), a low device-code limit (item 18), and
    started under the usual umask 022, under which files the service does not narrow are 0644."""
    port = free_port()
    saved = os.umask(0o022)
    try:
        running = Service.start(tmp_path_factory.mktemp("security-review"),
                                extra=CONFIGURED.format(port=port, codes=DEVICE_CODES))
    finally:
        os.umask(saved)
    running.sasl_port = port
    try:
        yield running
    finally:
        running.stop()


class Browser(requests.Session):
    """A browser that never follows a redirect, never waits long, and ignores the environment's
    proxies; `cookie` (a raw Cookie header) replaces its own cookies, as a thief's would."""

    def __init__(self, cookie: str | None = None) -> None:
        super().__init__()
        self.trust_env = False
        if cookie is not None:
            self.headers["Cookie"] = cookie

    def get(self, url, **kwargs):
        kwargs.setdefault("allow_redirects", False)
        return super().get(url, **kwargs)

    def request(self, method, url, **kwargs):
        kwargs.setdefault("allow_redirects", False)  # app.example is not ours to visit
        kwargs.setdefault("timeout", TIMEOUT)
        return super().request(method, url, **kwargs)


def code_grant_url(service: Service, client: dict, scope: str | None = "imap") -> tuple[str, str]:
    """An /authorize URL for `client`'s first redirect URI, and its PKCE verifier."""
    verifier, challenge = pkce_pair()
    return authorize_url(service.url, client["client_id"], client["redirect_uris"][0], challenge, scope), verifier


def new_log(service: Service, offset: int) -> str:
    return service.log()[offset:]


# -- item 5: sessions end at the server; a disabled user's tokens stay dead -------------------------

def test_item5_a_copied_session_cookie_dies_at_logout_password_change_and_disable(service):
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    name, password = service.user()

    def sign_in(password: str) -> tuple[Browser, str, dict]:
        """A browser that signed in; its session cookie as a thief copies it; the redirect's query."""
        browser = Browser()
        url, verifier = code_grant_url(service, app)
        params = redirect_params(login_and_consent(browser, service.url, url, name, password))
        params["verifier"] = verifier
        return browser, f"bb_session={browser.cookies['bb_session']}", params

    def signed_in(cookie: str) -> bool:
        """Whether another browser holding only this cookie is let through (consent is remembered)."""
        page = Browser(cookie).get(code_grant_url(service, app)[0])
        if page.status_code == 302:
            assert "code" in parse_qs(urlsplit(page.headers["Location"]).query), page.headers["Location"]
            return True
        assert page.status_code == 200 and form_fields(page.text)[1]["step"] == "login", page.text[:300]
        return False

    def settles_signed_out(cookie: str) -> None:
        wait_for(lambda: not signed_in(cookie), timeout=SETTLED, what="the copied session cookie to stop working")

    # Logout: the cookie copied before it no longer works in another browser.
    browser, cookie, first = sign_in(password)
    assert signed_in(cookie)
    action, fields = form_fields(browser.get(f"{service.url}/logout").text)
    assert browser.post(service.url + action, data=fields).status_code == 200
    settles_signed_out(cookie)

    # A password change ends every session of the user.
    _, cookie, _ = sign_in(password)
    assert signed_in(cookie)
    service.cli("user", "passwd", name, "--password-stdin", stdin="a brand new passphrase\n")
    settles_signed_out(cookie)

    # Disabling ends sessions and revokes tokens; enabling again brings neither back.
    tokens = exchange_code(service, app, first["code"], first["verifier"], redirect_uri=CB).json()
    assert introspect(service, resource_server, tokens["access_token"])["active"] is True
    _, cookie, _ = sign_in("a brand new passphrase")
    assert signed_in(cookie)
    service.cli("user", "disable", name)
    service.cli("user", "enable", name)
    wait_for(lambda: introspect(service, resource_server, tokens["access_token"]) == {"active": False},
             timeout=SETTLED, what="the access token to stay revoked after enable")
    refreshed = token_request(service, {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, app)
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant", refreshed.text
    settles_signed_out(cookie)


# -- item 6: who may introspect -----------------------------------------------------------------------

def test_item6_only_resource_servers_introspect_others_tokens(service):
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    snoop = service.client("--grant", "client_credentials", "--scope", "imap")  # confidential, no resource server
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    name, _ = service.user(email=f"{service.unique('victim')}@example.org")
    users_token = service.issue(name, app["client_id"], "imap", "--ttl", "600")
    snoops_own = token_request(service, {"grant_type": "client_credentials", "scope": "imap"}, snoop).json()

    assert introspect(service, snoop, users_token) == {"active": False}  # no username, no email
    assert introspect(service, snoop, snoops_own["access_token"])["active"] is True
    assert introspect(service, app, users_token)["username"] == name  # a client sees its own
    assert introspect(service, resource_server, users_token)["username"] == name

    # judge, as for a SASL login: a token naming no user is not active for a user's service.
    def for_imap(token: str) -> dict:
        response = requests.post(f"{service.url}/introspect", data={"token": token},
                                 auth=(resource_server["client_id"], resource_server["client_secret"]),
                                 headers={"X-Dovecot-Auth-Service": "imap"}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()
    assert introspect(service, resource_server, snoops_own["access_token"])["active"] is True
    assert for_imap(snoops_own["access_token"]) == {"active": False}
    assert for_imap(users_token)["username"] == name


# -- item 7: operator scopes --------------------------------------------------------------------------

def test_item7_no_user_grants_an_operator_scope_and_the_cli_keeps_to_a_clients_scopes(service):
    greedy = service.client("--redirect-uri", CB, "--scope", "imap metrics")
    for scope in ("imap metrics", "metrics", None):  # asked for, or the registered scopes by default
        answer = Browser().get(code_grant_url(service, greedy, scope)[0])
        params = redirect_params(answer)
        assert params["error"] == "invalid_scope" and "metrics" in params["error_description"], (scope, params)
    login_page = Browser().get(code_grant_url(service, greedy, "imap")[0])
    assert login_page.status_code == 200 and form_fields(login_page.text)[1]["step"] == "login"

    plain = service.client("--redirect-uri", CB)  # no --scope: every scope but the operator's
    assert "metrics" not in plain["scope"].split() and "imap" in plain["scope"].split()
    name, _ = service.user()
    with pytest.raises(CliError, match="not registered for metrics"):
        service.issue(name, plain["client_id"], "metrics")
    with pytest.raises(CliError, match="positive"):
        service.issue(name, plain["client_id"], "imap", "--ttl", "0")


# -- item 8: hostile input gets an OAuth error, not a 503 and a traceback ------------------------------

def test_item8_quotes_backslashes_and_non_ascii_get_400_and_401_not_503(service):
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    offset = len(service.log())
    for redirect_uri, response_type in (('https://app.example/cb"', "code"), ("https://app.example\\cb", "code"),
                                        ("https://app.example/cb\u00e9", "code"), (CB, 'code"'),
                                        (CB, "code\u00e9")):
        url = authorize_url(service.url, app["client_id"], redirect_uri, pkce_pair()[1], "imap",
                            response_type=response_type)
        page = Browser().get(url)
        assert page.status_code == 400 and "Location" not in page.headers, (redirect_uri, response_type, page.text)
        assert 'id="error">invalid_request' in page.text, page.text
    for path in ("/token", "/introspect"):
        for header in ("Basic \u00e9t\u00e9".encode("latin-1"), "Basic \u00e9t\u00e9".encode()):
            answer = requests.post(f"{service.url}{path}", data={"grant_type": "client_credentials", "token": "t"},
                                   headers={"Authorization": header}, timeout=TIMEOUT)
            assert answer.status_code == 401 and answer.json()["error"] == "invalid_client", (path, answer.text)
            assert answer.headers["WWW-Authenticate"] == "Basic"
    log = wait_for(lambda: (text := new_log(service, offset)).count("Refused a request to") >= 4 and text,
                   timeout=SETTLED, what="the refusals to be logged")
    assert log.count("Authorization refused with a page: invalid_request") == 5, log
    assert "Traceback" not in log and "Request to /" not in log and "temporarily_unavailable" not in log, log


# -- item 9: a planted CSRF cookie --------------------------------------------------------------------

def test_item9_a_planted_csrf_cookie_is_replaced_and_a_form_posted_with_it_refused(service):
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    name, password = service.user()
    url, _ = code_grant_url(service, app)
    planted = f"x|1|client_id={app['client_id']}"
    browser = Browser()
    page = browser.get(url, headers={"Cookie": f"bb_csrf={planted}"})
    assert page.status_code == 200
    issued = browser.cookies.get("bb_csrf")
    assert issued and issued != planted and "|" not in issued, page.headers.get("Set-Cookie")
    action, fields = form_fields(page.text)
    login = {**fields, "username": name, "password": password}
    refused = browser.post(service.url + action, data=login, headers={"Cookie": f"bb_csrf={planted}"})
    assert refused.status_code == 400 and "The form has expired" in refused.text, refused.text[:500]
    assert "bb_session" not in browser.cookies
    # The same form with the cookie the service issued signs in (the refusal was the cookie's).
    accepted = browser.post(service.url + action, data=login, headers={"Cookie": f"bb_csrf={issued}"})
    assert accepted.status_code == 200 and form_fields(accepted.text)[1]["step"] == "consent", accepted.text[:500]


# -- item 10: identifiers that collide ----------------------------------------------------------------

def test_item10_names_and_addresses_are_unique_whatever_their_case_and_across_each_other(service):
    alice = service.unique("alice")
    email = f"{alice}@example.org"
    service.cli("user", "add", alice, "--email", email, "--password-stdin", stdin="alice's passphrase\n")
    mallory = service.unique("mallory")
    for args in ((alice.upper(),), (alice.capitalize(),),               # alice's name, another case
                 (mallory, "--email", email.upper()),                   # alice's address, another case
                 (mallory, "--email", alice),                           # an address that is alice's name
                 (email,), (email.upper(),)):                           # a name that is alice's address
        with pytest.raises(CliError, match="exists already|taken by user"):
            service.cli("user", "add", *args, "--password-stdin", stdin="mallory's passphrase\n")
    # The refusals left nothing behind: mallory is free, under an address of their own.
    service.cli("user", "add", mallory, "--email", f"{mallory}@example.org", "--password-stdin", stdin="pw\n")


# -- item 11: a VERSION line with too many digits -----------------------------------------------------

class DovecotConnection:
    """A mail server's connection to the Dovecot auth socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""
        self.greeting = []
        while (line := self.line()) != "DONE":
            self.greeting.append(line)

    def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the service closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def closed(self) -> bool:
        try:
            self.line()
        except ConnectionError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def test_item11_a_version_with_thousands_of_digits_is_a_protocol_error_not_a_crash(configured):
    service = configured
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    name, _ = service.user()
    token = service.issue(name, app["client_id"], "imap", "--ttl", "600")
    resp = base64.b64encode(f"n,,\x01auth=Bearer {token}\x01\x01".encode()).decode()
    huge = b"9" * 5000  # int() refuses more than 4,300 digits
    offset = len(service.log())

    # After a good handshake: the line is ignored, and the connection goes on to log in.
    greeted = DovecotConnection(service.sasl_port)
    try:
        greeted.sock.sendall(b"VERSION\t1\t0\nCPID\t4242\nVERSION\t1\t" + huge + b"\n")
        greeted.sock.sendall(f"AUTH\t1\tOAUTHBEARER\tservice=imap\tnologin\tresp={resp}\n".encode())
        assert greeted.line() == f"OK\t1\tuser={name}"
    finally:
        greeted.close()

    # In place of the handshake: refused and closed, with a warning rather than a traceback.
    first = DovecotConnection(service.sasl_port)
    try:
        first.sock.sendall(b"VERSION\t" + huge + b"\t0\n")
        assert first.closed()
    finally:
        first.close()

    log = wait_for(lambda: "skipped the VERSION handshake" in (text := new_log(service, offset)) and text,
                   timeout=SETTLED, what="the refusal to be logged")
    assert log.count("ignored line") == 2, log
    assert "Traceback" not in log and "integer string conversion" not in log, log


# -- item 14: headers on every page, and no listing ---------------------------------------------------

def test_item14_twisteds_own_pages_carry_the_security_headers_and_static_lists_nothing(service):
    def secured(answer: requests.Response) -> bool:
        return (answer.headers.get("X-Frame-Options") == "DENY"
                and answer.headers.get("X-Content-Type-Options") == "nosniff"
                and answer.headers.get("Referrer-Policy") == "no-referrer"
                and "frame-ancestors 'none'" in answer.headers.get("Content-Security-Policy", ""))

    browser = Browser()
    for answer, code in ((browser.get(f"{service.url}/no-such-page"), 404), (browser.get(f"{service.url}/"), 200),
                         (browser.get(f"{service.url}/token"), 405),
                         (browser.put(f"{service.url}/authorize"), 501),
                         (browser.get(f"{service.url}/static/style.css"), 200)):
        assert answer.status_code == code, (answer.request.method, answer.url, answer.status_code)
        assert secured(answer), (answer.url, dict(answer.headers))
    for path in ("/static/", "/static"):
        listing = browser.get(f"{service.url}{path}")
        assert listing.status_code in (302, 404) and "style.css" not in listing.text, (path, listing.text[:300])
        assert secured(listing), path


# -- item 15: 303 after a POST ------------------------------------------------------------------------

def test_item15_the_login_and_consent_posts_answer_303(service):
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    name, password = service.user()

    def post_form(browser: Browser, page: requests.Response, **values: str) -> requests.Response:
        action, fields = form_fields(page.text)
        return browser.post(service.url + action, data={**fields, **values})

    browser = Browser()
    login = browser.get(code_grant_url(service, app)[0])
    consent = post_form(browser, login, username=name, password=password)
    assert consent.status_code == 200 and form_fields(consent.text)[1]["step"] == "consent"
    approved = post_form(browser, consent, decision="approve")
    assert approved.status_code == 303 and "code" in redirect_params(approved), approved.status_code
    assert approved.headers["Location"].startswith(CB + "?")

    # Consent remembered: the login POST itself redirects to the client, with a 303 too.
    other = Browser()
    answered = post_form(other, other.get(code_grant_url(service, app)[0]), username=name, password=password)
    assert answered.status_code == 303 and "code" in redirect_params(answered), answered.status_code
    # A GET's redirect stays a 302.
    again = other.get(code_grant_url(service, app)[0])
    assert again.status_code == 302 and "code" in redirect_params(again)

    # Denied consent, for another client, is a 303 as well.
    other_app = service.client("--redirect-uri", CB, "--scope", "imap")
    consent = other.get(code_grant_url(service, other_app)[0])
    denied = post_form(other, consent, decision="deny")
    assert denied.status_code == 303 and redirect_params(denied)["error"] == "access_denied"


# -- item 16: the database is the owner's alone -------------------------------------------------------

def test_item16_the_sqlite_database_and_its_journal_are_0600(configured):
    service = configured
    service.user()  # a write, so that the journal is surely there
    files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in service.directory.glob("bearerbridge.db*")}
    assert set(files) >= {"bearerbridge.db", "bearerbridge.db-wal", "bearerbridge.db-shm"}, files
    assert set(files.values()) == {0o600}, {name: oct(mode) for name, mode in files.items()}


# -- item 18: a parameter given twice, and device codes without end ------------------------------------

def test_item18_a_repeated_scope_is_refused_and_device_codes_per_client_are_limited(service, configured):
    machine = service.client("--grant", "client_credentials", "--scope", "imap smtp")
    repeated = requests.post(f"{service.url}/token",
                             data=[("grant_type", "client_credentials"), ("scope", "imap"), ("scope", "smtp")],
                             auth=(machine["client_id"], machine["client_secret"]), timeout=TIMEOUT)
    assert repeated.status_code == 400 and repeated.json()["error"] == "invalid_request", repeated.text
    assert "given more than once" in repeated.json()["error_description"]
    once = token_request(service, {"grant_type": "client_credentials", "scope": "imap smtp"}, machine)
    assert once.status_code == 200 and once.json()["scope"] == "imap smtp", once.text

    tv, radio = (configured.client("--public", "--grant", "device_code", "--scope", "imap") for _ in range(2))

    def ask(client: dict) -> requests.Response:
        return requests.post(f"{configured.url}/device_authorization",
                             data={"client_id": client["client_id"], "scope": "imap"}, timeout=TIMEOUT)
    assert [ask(tv).status_code for _ in range(DEVICE_CODES)] == [200] * DEVICE_CODES
    refused = ask(tv)
    assert refused.status_code == 429 and refused.json()["error"] == "slow_down", refused.text
    assert ask(radio).status_code == 200  # another client is not held up

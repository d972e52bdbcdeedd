"""Roundcube webmail signing a user in with bearerbridge (OpenID Connect, code grant) and reading
their mail from Dovecot with the access token it got, all real: Roundcube 1.6.5 running
conf/roundcube/config.inc.php, Dovecot 2.3.19 running conf/dovecot, and a headless Chromium
clicking through. Twice over:

- `webmail`: opaque access tokens; Dovecot's oauth2 passdb asks bearerbridge's RFC 7662
  introspection about each (dovecot-oauth2.conf.ext).
- `local_webmail`: RFC 9068 JWT access tokens (`[tokens] jwt_type = "JWT"`, Roundcube's client
  registered with `--token-format jwt`); Dovecot validates them by itself
  (dovecot-oauth2-local.conf.ext) with the public keys `bearerbridge keys dovecot` wrote, and
  never asks bearerbridge.

Needs Debian's roundcube-core, php-cli, php-sqlite3, dovecot-imapd and chromium
(scripts/install-peers) and root; skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from .peers import CONF, Dovecot, PeerError, log_since, log_size, start_dovecot
from .peers_roundcube import DOCUMENT_ROOT, PHP, Roundcube, session_authorizations, start_roundcube
from .support import (
    Service,
    authorize_url,
    exchange_code,
    get_code,
    introspect,
    login_and_consent,
    missing,
    redirect_params,
    require_peer,
    token_request,
    wait_for,
)

pytestmark = pytest.mark.peer

WAIT = 20  # seconds, for every step of the browser and every IMAP exchange
SCOPE = "openid email imap"  # what conf/roundcube/config.inc.php asks for
DOVEADM = "/usr/bin/doveadm"
# The local-validation snippet and its placeholders, each replaced by the test's value.
DOVECOT_LOCAL_SNIPPET = CONF / "dovecot" / "dovecot-oauth2-local.conf.ext"
ISSUER_PLACEHOLDER = "https://auth.example.org"
KEYS_PLACEHOLDER = "/var/lib/dovecot/bearerbridge-keys/"
# What local validation needs of bearerbridge: JWT access tokens typed as Dovecot 2.3.19 wants.
LOCAL_EXTRA = '[tokens]\njwt_type = "JWT"\n'
DELIVERER_REDIRECT_URI = "https://deliver.example/cb"


@dataclass
class Webmail:
    service: Service
    dovecot: Dovecot
    roundcube: Roundcube
    client: dict  # Roundcube's, as registered
    resource_server: dict  # Dovecot's, which introspects
    deliverer: dict  # another app with the imap scope, which puts the test's messages in place

    def logs(self) -> dict[str, Path]:
        return peer_log_paths(self.service, self.dovecot, self.roundcube)


@dataclass
class LocalWebmail:
    """The same programs, but bearerbridge issues JWT access tokens to Roundcube and Dovecot checks
    them by itself, with the keys in `keys`: it has no introspection URL nor credentials."""

    service: Service  # replaced when a test restarts it (`restart`)
    dovecot: Dovecot
    roundcube: Roundcube
    client: dict  # Roundcube's, registered with --token-format jwt
    deliverer: dict  # another app whose JWTs put the test's messages in place
    watcher: dict  # a client with the metrics scope, reading bearerbridge's /metrics
    keys: Path  # the prefix of Dovecot's local_validation_key_dict, written by `keys dovecot`

    def logs(self) -> dict[str, Path]:
        return peer_log_paths(self.service, self.dovecot, self.roundcube)


def peer_log_paths(service: Service, dovecot: Dovecot, roundcube: Roundcube) -> dict[str, Path]:
    return {"bearerbridge": service.directory / "twistd.log", "dovecot": dovecot.log_path,
            **{f"roundcube {path.name}": path for path in
               (roundcube.log_directory / "errors.log", roundcube.log_directory / "imap.log",
                roundcube.directory / "php.out")}}


def require_peers() -> None:
    require_peer("/usr/sbin/dovecot")
    require_peer(PHP, "php")
    require_peer(str(DOCUMENT_ROOT / "index.php"))
    if os.geteuid() != 0:
        missing("the Dovecot peer runs as root (as CI does)")


def make_directories(top: Path) -> dict[str, Path]:
    directories = {name: top / name for name in ("bearerbridge", "dovecot", "roundcube")}
    for directory in directories.values():
        directory.mkdir()
    return directories


@pytest.fixture(scope="module")
def webmail(tmp_path_factory) -> Webmail:
    require_peers()
    directories = make_directories(tmp_path_factory.mktemp("webmail"))
    # [sasl.services] keeps its default, imap = "imap": Dovecot's introspections name the imap
    # service, and bearerbridge answers them active only for tokens holding the imap scope.
    service = Service.start(directories["bearerbridge"])
    started: list = [service]
    try:
        resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
        # Roundcube logs in to IMAP with the user's email (the ID token's `email` claim), so
        # Dovecot must compare it with the introspection's `email`, not its `username`.
        dovecot = start_dovecot(directories["dovecot"], service.url, resource_server["client_id"],
                                resource_server["client_secret"], overrides={"username_attribute": "email"})
        started.append(dovecot)
        roundcube = Roundcube(directories["roundcube"])
        client = service.client("--redirect-uri", roundcube.redirect_uri, "--scope", SCOPE, "--no-pkce")
        start_roundcube(roundcube, service.url, client["client_id"], client["client_secret"], dovecot.port)
        started.append(roundcube)
        deliverer = service.client("--redirect-uri", DELIVERER_REDIRECT_URI, "--scope", "imap")
        yield Webmail(service, dovecot, roundcube, client, resource_server, deliverer)
    finally:
        for peer in reversed(started):
            peer.stop()


def dovecot_local_oauth2(issuer: str, keys: Path) -> str:
    """conf/dovecot/dovecot-oauth2-local.conf.ext with the test's issuer and key directory, and
    (test only) `debug = yes`."""
    text = DOVECOT_LOCAL_SNIPPET.read_text()
    for placeholder in (ISSUER_PLACEHOLDER, KEYS_PLACEHOLDER):
        if placeholder not in text:
            raise PeerError(f"{DOVECOT_LOCAL_SNIPPET} no longer has {placeholder}; {__name__} replaces it")
    text = text.replace(ISSUER_PLACEHOLDER, issuer.rstrip("/")).replace(KEYS_PLACEHOLDER, f"{keys}/")
    return text + "\n# Test only: the oauth2 passdb's own debug lines.\ndebug = yes\n"


@pytest.fixture(scope="module")
def local_webmail(tmp_path_factory) -> LocalWebmail:
    require_peers()
    require_peer(DOVEADM)
    directories = make_directories(tmp_path_factory.mktemp("local-webmail"))
    # Dovecot's auth process (user dovecot) reads the key files at their first use, so they cannot
    # live in pytest's root-only tmp; stopping the fixture removes them.
    keys = Path(tempfile.mkdtemp(prefix="bearerbridge-dovecot-keys-"))
    keys.chmod(0o755)
    service = Service.start(directories["bearerbridge"], extra=LOCAL_EXTRA)
    dovecot = roundcube = webmail = None
    try:
        print(service.cli("keys", "dovecot", str(keys)))
        # Dovecot's oauth2 args come from the snippet alone: no introspection URL, no credentials.
        oauth2 = dovecot_local_oauth2(service.url, keys)
        names = set(re.findall(r"(?m)^([a-z_]+) *=", oauth2))
        assert "introspection_mode" in names and not names & {"introspection_url", "tokeninfo_url", "client_id",
                                                              "client_secret"}, oauth2
        dovecot = start_dovecot(directories["dovecot"], service.url, "", "", oauth2_text=oauth2)
        roundcube = Roundcube(directories["roundcube"])
        client = service.client("--redirect-uri", roundcube.redirect_uri, "--scope", SCOPE, "--no-pkce",
                                "--token-format", "jwt")
        start_roundcube(roundcube, service.url, client["client_id"], client["client_secret"], dovecot.port)
        deliverer = service.client("--redirect-uri", DELIVERER_REDIRECT_URI, "--scope", "imap",
                                   "--token-format", "jwt")
        watcher = service.client("--grant", "client_credentials", "--scope", "metrics")
        webmail = LocalWebmail(service, dovecot, roundcube, client, deliverer, watcher, keys)
        yield webmail
    finally:
        for peer in (roundcube, dovecot, webmail.service if webmail else service):
            if peer is not None:
                peer.stop()
        shutil.rmtree(keys, ignore_errors=True)


@pytest.fixture(autouse=True)
def peer_logs(request):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    stack = request.getfixturevalue("local_webmail" if "local_webmail" in request.fixturenames else "webmail")
    offsets = {name: log_size(path) for name, path in stack.logs().items()}
    yield
    for name, path in stack.logs().items():
        print(f"----- {name} ({path}) during the test -----\n{log_since(path, offsets.get(name, 0))}")


# -- helpers ----------------------------------------------------------------------------------

def deliver(webmail: Webmail | LocalWebmail, username: str, email: str, subject: str) -> None:
    """Put a message in the user's INBOX with IMAP APPEND, through another app's token (not
    Roundcube's: what Roundcube shows comes from the mailbox, not from its own doing); a JWT
    where the deliverer is registered for them."""
    token = webmail.service.issue(username, webmail.deliverer["client_id"], "imap")
    before = log_size(webmail.dovecot.log_path)
    append_message(webmail.dovecot.port, email, f"Bearer {token}", subject)
    # Dovecot's log process writes the session's lines a moment later: wait for them, so that a
    # test reading the log from here on sees none of the delivery's.
    logged_out = re.compile(rf"imap\({re.escape(email)}\).*Logged out")
    wait_for(lambda: logged_out.search(log_since(webmail.dovecot.log_path, before)), timeout=10,
             what="Dovecot to log the delivery's logout")


def append_message(port: int, email: str, authorization: str, subject: str) -> None:
    """IMAP APPEND a message with `subject` to the INBOX of `email`, logged in with XOAUTH2."""
    message = EmailMessage()
    message["From"] = "Alice Example <alice@example.net>"
    message["To"] = email
    message["Subject"] = subject
    message["Date"] = "Fri, 04 Dec 2026 10:00:00 +0000"
    message.set_content("Hello from the Roundcube test.\n")
    with imap_session(port, email, authorization) as imap:
        status, data = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), message.as_bytes())
        assert status == "OK", data


def xoauth2(email: str, authorization: str) -> bytes:
    """XOAUTH2's initial response as Roundcube sends it: `user=<email>` and
    `auth=<authorization>` ("<token_type> <access_token>")."""
    return f"user={email}\x01auth={authorization}\x01\x01".encode()


@contextlib.contextmanager
def imap_session(port: int, email: str, authorization: str):
    """An IMAP session logged in with XOAUTH2 as Roundcube logs in."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
    try:
        status, data = imap.authenticate("XOAUTH2", lambda challenge: xoauth2(email, authorization))
        assert status == "OK", data
        yield imap
    finally:
        imap.logout()


def imap_login(port: int, email: str, authorization: str) -> tuple[list[dict], str | None]:
    """Try an XOAUTH2 login: the JSON errors Dovecot sent as challenges (each answered with the
    empty response XOAUTH2 wants), and its tagged NO; None if it logged in."""
    errors: list[dict] = []

    def respond(challenge: bytes) -> bytes:
        if challenge:
            errors.append(json.loads(challenge))
            return b""
        return xoauth2(email, authorization)

    imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
    try:
        imap.authenticate("XOAUTH2", respond)
    except imaplib.IMAP4.error as refused:
        return errors, str(refused)
    finally:
        imap.logout()
    return errors, None


def imap_refusal(port: int, email: str, authorization: str) -> tuple[list[dict], str]:
    """imap_login, which must be refused."""
    errors, refusal = imap_login(port, email, authorization)
    assert refusal is not None, f"Dovecot let {email} log in"
    return errors, refusal


def imap_subjects(port: int, email: str, authorization: str) -> list[str]:
    """The subjects in the INBOX, read over IMAP with XOAUTH2."""
    with imap_session(port, email, authorization) as imap:
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        status, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK", data
        return [part[1].decode().strip().removeprefix("Subject: ") for part in data if isinstance(part, tuple)]


def sign_in_at_bearerbridge(browser, webmail: Webmail | LocalWebmail, username: str, password: str) -> None:
    """From Roundcube's login page, click "Login with bearerbridge" and sign in; stop at consent."""
    wait = WebDriverWait(browser, WAIT)
    browser.get(webmail.roundcube.url + "/")
    button = wait.until(EC.element_to_be_clickable((By.ID, "rcmloginoauth")))
    assert button.text == "Login with bearerbridge"
    button.click()
    # bearerbridge's error page, or its error sent back to Roundcube and shown there, would end it.
    refused = (By.CSS_SELECTOR, "#error, #messagestack .warning")
    wait.until(EC.any_of(EC.element_to_be_clickable((By.ID, "sign-in")), EC.presence_of_element_located(refused)))
    assert not browser.find_elements(*refused), (browser.current_url, browser.find_element(*refused).text)
    assert browser.current_url.startswith(webmail.service.url + "/authorize?")
    query = parse_qs(urlsplit(browser.current_url).query)
    # What Roundcube 1.6.5 asks for: no PKCE, no nonce (see conf/roundcube/config.inc.php).
    assert {name: values[0] for name, values in query.items() if name != "state"} == {
        "response_type": "code", "client_id": webmail.client["client_id"], "scope": SCOPE,
        "redirect_uri": webmail.roundcube.redirect_uri}, query
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(EC.element_to_be_clickable((By.ID, "approve")))
    assert webmail.client["name"] in browser.find_element(By.TAG_NAME, "main").text


def inbox_row(browser, webmail: Webmail | LocalWebmail, subject: str):
    """Once Roundcube has logged in to Dovecot and listed the INBOX, the row of `subject` in it;
    fails at once if Roundcube shows a warning instead (e.g. "Login failed." on its login page)."""
    wait = WebDriverWait(browser, WAIT)
    listed = (By.XPATH, f"//table[@id='messagelist']//tr[.//span[@class='subject']//span[text()='{subject}']]")
    warning = (By.CSS_SELECTOR, "#messagestack .warning")
    wait.until(EC.any_of(EC.visibility_of_element_located(listed), EC.visibility_of_element_located(warning)))
    assert not browser.find_elements(*warning), (browser.current_url, browser.find_element(*warning).text)
    assert browser.current_url == f"{webmail.roundcube.url}/?_task=mail&_mbox=INBOX"
    return browser.find_element(*listed)


def dovecot_xoauth2_logins(dovecot: Dovecot, offset: int, email: str,
                           checked_by: str = "Introspection succeeded") -> list[str]:
    """The sessions of Dovecot's XOAUTH2 logins as `email` logged after `offset` whose token its
    oauth2 passdb checked as `checked_by` says: by introspection at bearerbridge, or
    "Local validation succeeded"."""
    log = log_since(dovecot.log_path, offset, limit=10**7)
    sessions = re.findall(rf"imap-login: Info: Login: user=<{re.escape(email)}>, method=XOAUTH2, .* "
                          rf"session=<([^>]+)>", log)
    return [session for session in sessions
            if f"oauth2({email},127.0.0.1,<{session}>): {checked_by}" in log]


def wait_for_logins(dovecot: Dovecot, offset: int, email: str, checked_by: str = "Introspection succeeded"
                    ) -> list[str]:
    """dovecot_xoauth2_logins, once there is one (Dovecot writes its log a moment after)."""
    deadline = time.monotonic() + WAIT
    while not (sessions := dovecot_xoauth2_logins(dovecot, offset, email, checked_by)):
        assert time.monotonic() < deadline, log_since(dovecot.log_path, offset)
        time.sleep(0.1)
    return sessions


def jwt_access_token(webmail: LocalWebmail, client: dict, username: str, password: str, scope: str) -> str:
    """An access token of `client` for the user, from the code grant (with PKCE) as an app gets it."""
    code, verifier = get_code(webmail.service, client, username, password, scope)
    response = exchange_code(webmail.service, client, code, verifier, redirect_uri=client["redirect_uris"][0])
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == scope, response.json()
    return response.json()["access_token"]


def verified_jwt(service: Service, token: str) -> tuple[dict, dict]:
    """The header and claims of a JWT access token, its signature checked against /jwks."""
    published = KeySet.import_key_set(requests.get(f"{service.url}/jwks", timeout=10).json())
    decoded = jwt.decode(token, published, algorithms=["ES256", "RS256"])
    return decoded.header, decoded.claims


def introspections(webmail: LocalWebmail) -> float:
    """How many introspection requests bearerbridge has answered since it started, whatever their
    result, from its /metrics (bearerbridge_introspections_total)."""
    response = token_request(webmail.service, {"grant_type": "client_credentials", "scope": "metrics"},
                             webmail.watcher)
    assert response.status_code == 200, response.text
    metrics = requests.get(f"{webmail.service.url}/metrics", timeout=10,
                           headers={"Authorization": f"Bearer {response.json()['access_token']}"})
    assert metrics.status_code == 200, metrics.text
    families = {family.name: family for family in text_string_to_metric_families(metrics.text)}
    assert "bearerbridge_introspections" in families, sorted(families)
    return sum(sample.value for sample in families["bearerbridge_introspections"].samples
               if sample.name == "bearerbridge_introspections_total")


def exported_keys(keys: Path) -> set[str]:
    """The keys `keys dovecot` wrote, as `<ALG>/<kid>`."""
    return {f"{path.parent.name}/{path.name}" for path in (keys / "default").glob("*/*")}


def signing_kid(service: Service, alg: str = "ES256") -> str:
    """The kid of the key that signs for `alg` now, from `bearerbridge keys list`."""
    rows = [line.split() for line in service.cli("keys", "list").splitlines()]
    return next(row[0] for row in rows if row[1:3] == [alg, "current"])


def restart(webmail: LocalWebmail) -> None:
    """Stop bearerbridge and start it again on the same directory, URL and port: it signs with the
    current keys at once (a running one takes them up within a minute)."""
    webmail.service.stop()
    port = urlsplit(webmail.service.url).port
    webmail.service = Service.start(webmail.service.directory, url=webmail.service.url,
                                    listen=[f"tcp:{port}:interface=127.0.0.1"], extra=LOCAL_EXTRA)


def doveadm_reload(dovecot: Dovecot) -> None:
    """`doveadm reload`: Dovecot starts new auth processes, which have read no key yet."""
    done = subprocess.run([DOVEADM, "-c", str(dovecot.config_path), "reload"], capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (done.stdout, done.stderr)


@dataclass(frozen=True)
class Opened:
    """A user whose INBOX Roundcube listed after they signed in through bearerbridge."""
    username: str
    email: str
    subject: str           # of the one message in their INBOX
    authorization: str     # what Roundcube logs in with: "Bearer <access token>"
    dovecot_log: int       # where Dovecot's log stood before the sign-in

    @property
    def access_token(self) -> str:
        return self.authorization.partition(" ")[2]


def open_inbox(webmail: Webmail | LocalWebmail, browser, name: str) -> Opened:
    """A new user with one message signs in through Roundcube and approves; Roundcube lists that
    message, and holds one new credential, a bearer token."""
    email = f"{webmail.service.unique(name)}@example.org"
    username, password = webmail.service.user(email=email)
    subject = f"Figures {webmail.service.unique('subject')}"
    deliver(webmail, username, email, subject)
    dovecot_log = log_size(webmail.dovecot.log_path)
    sessions_before = set(session_authorizations(webmail.roundcube))

    sign_in_at_bearerbridge(browser, webmail, username, password)
    browser.find_element(By.ID, "approve").click()

    row = inbox_row(browser, webmail, subject)
    sender = row.find_element(By.CLASS_NAME, "rcmContactAddress")
    assert (sender.text, sender.get_attribute("title")) == ("Alice Example", "alice@example.net")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messagelist tr.message")) == 1
    new = set(session_authorizations(webmail.roundcube)) - sessions_before
    assert len(new) == 1, new
    authorization = new.pop()
    assert authorization.partition(" ")[0] == "Bearer", authorization
    return Opened(username, email, subject, authorization, dovecot_log)


# -- the tests --------------------------------------------------------------------------------

def test_roundcube_signs_in_with_bearerbridge_and_opens_the_inbox_over_xoauth2(webmail, browser):
    # Roundcube redeems the code, logs in to Dovecot as the ID token's email, and lists the INBOX.
    opened = open_inbox(webmail, browser, "reader")
    username, email, subject, authorization = opened.username, opened.email, opened.subject, opened.authorization

    # Dovecot logged XOAUTH2 logins as the email, each token introspected at bearerbridge.
    wait_for_logins(webmail.dovecot, opened.dovecot_log, email)

    # The credential Roundcube logs in with is bearerbridge's access token for Roundcube, the
    # user and the scopes it asked for.
    answer = introspect(webmail.service, webmail.resource_server, opened.access_token)
    assert answer["active"] is True, answer
    assert answer["client_id"] == webmail.client["client_id"], answer
    assert (answer["username"], answer["email"]) == (username, email), answer
    assert sorted(answer["scope"].split()) == sorted(SCOPE.split()), answer
    # ... and that same token reads the same INBOX over XOAUTH2.
    assert imap_subjects(webmail.dovecot.port, email, authorization) == [subject]


def test_the_token_response_holds_what_roundcube_reads(webmail):
    """The code grant as Roundcube 1.6.5 makes it (rcmail_oauth::request_access_token): no PKCE,
    no nonce, client_secret_post. It takes the IMAP user name from the ID token's `email`
    (decoded, never verified; refused if `azp` is not its client_id or `aud` lacks it) and
    skips /userinfo then; it sends "<token_type> <access_token>" verbatim; and a token without
    `expires_in` counts as expired at once."""
    email = f"{webmail.service.unique('direct')}@example.org"
    username, password = webmail.service.user(email=email)
    client_id = webmail.client["client_id"]
    url = authorize_url(webmail.service.url, client_id, webmail.roundcube.redirect_uri, None, SCOPE, state="rc1")
    with requests.Session() as browser:
        browser.trust_env = False
        params = redirect_params(login_and_consent(browser, webmail.service.url, url, username, password))
    assert params["state"] == "rc1", params
    response = token_request(webmail.service, {"grant_type": "authorization_code", "code": params["code"],
                                               "redirect_uri": webmail.roundcube.redirect_uri},
                             webmail.client, basic=False)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer", tokens
    assert isinstance(tokens["expires_in"], int) and tokens["expires_in"] > 10, tokens
    assert tokens["access_token"], tokens
    claims = json.loads(base64.urlsafe_b64decode(tokens["id_token"].split(".")[1] + "=="))
    assert client_id in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]), claims
    assert claims.get("azp", client_id) == client_id, claims
    assert claims["email"] == email, claims
    assert claims["iss"] == webmail.service.url, claims


def test_a_user_who_denies_consent_stays_on_roundcubes_login_page(webmail, browser):
    email = f"{webmail.service.unique('denier')}@example.org"
    username, password = webmail.service.user(email=email)
    deliver(webmail, username, email, "Nobody should see this")
    dovecot_log = log_size(webmail.dovecot.log_path)
    sessions_before = set(session_authorizations(webmail.roundcube))

    sign_in_at_bearerbridge(browser, webmail, username, password)
    browser.find_element(By.ID, "deny").click()

    # bearerbridge sends the browser back to Roundcube with the RFC 6749 §4.1.2.1 error ...
    wait = WebDriverWait(browser, WAIT)
    wait.until(lambda b: b.current_url.startswith(webmail.roundcube.redirect_uri + "?"))
    callback = {name: values[0] for name, values in parse_qs(urlsplit(browser.current_url).query).items()}
    assert (callback["error"], callback["iss"]) == ("access_denied", webmail.service.url), callback
    assert "code" not in callback, callback
    # ... and Roundcube shows its error_description as a warning on the login page.
    warning = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#messagestack .warning span")))
    assert callback["error_description"], callback
    assert warning.text == callback["error_description"], callback
    assert browser.find_element(By.ID, "rcmloginoauth").is_displayed()
    assert not browser.find_elements(By.ID, "messagelist")

    # No new Roundcube session holds a token, and opening the mail task shows the login page again.
    browser.get(webmail.roundcube.url + "/?_task=mail")
    wait.until(EC.element_to_be_clickable((By.ID, "rcmloginoauth")))
    assert not browser.find_elements(By.ID, "messagelist")
    assert set(session_authorizations(webmail.roundcube)) == sessions_before
    assert f"user=<{email}>" not in log_since(webmail.dovecot.log_path, dovecot_log)


# -- the same, with JWT access tokens that Dovecot validates by itself -------------------------

def test_roundcube_opens_the_inbox_with_a_jwt_that_dovecot_validates_by_itself(local_webmail, browser):
    webmail = local_webmail
    # Roundcube logs in to Dovecot with the JWT it got and lists the INBOX.
    opened = open_inbox(webmail, browser, "jwt-reader")
    username, email, subject, authorization = opened.username, opened.email, opened.subject, opened.authorization
    access_token, dovecot_log = opened.access_token, opened.dovecot_log

    # Dovecot validated each of its logins by itself, the token coming in Roundcube's one
    # SASL-IR line ...
    sessions = wait_for_logins(webmail.dovecot, dovecot_log, email, "Local validation succeeded")
    log = log_since(webmail.dovecot.log_path, 0, limit=10**7)
    assert all(re.search(rf"client in: AUTH\t\d+\tXOAUTH2\t.*\tsession={re.escape(session)}\t.*\tresp=<hidden>",
                         log) for session in sessions), log
    assert "introspection" not in log.lower(), log
    # ... and bearerbridge answered no introspection since it started (the deliverer's, the
    # user's and Roundcube's logins included).
    assert introspections(webmail) == 0

    # The credential Roundcube logs in with is a JWT typed "JWT", whose key `keys dovecot` wrote,
    # signed by bearerbridge for Roundcube's client and this user.
    header, claims = verified_jwt(webmail.service, access_token)
    assert (header["typ"], header["alg"]) == ("JWT", "ES256"), header
    assert f"ES256/{header['kid']}" in exported_keys(webmail.keys), (header, exported_keys(webmail.keys))
    assert f"dict(fs): Lookup finished for 'shared/default/ES256/{header['kid']}': found" in log, log
    assert claims["iss"] == webmail.service.url, claims
    assert claims["client_id"] == webmail.client["client_id"], claims
    assert (claims["preferred_username"], claims["email"]) == (username, email), claims
    assert sorted(claims["scope"].split()) == sorted(SCOPE.split()), claims
    assert "azp" not in claims, claims  # so Dovecot looks its key up under default/

    # Local validation cannot see a revocation: once Roundcube's token is revoked, bearerbridge
    # refuses it, yet Dovecot, which asks nobody, still opens the INBOX with it until it expires.
    client = webmail.client

    def userinfo() -> requests.Response:
        return requests.get(f"{webmail.service.url}/userinfo", timeout=10, headers={"Authorization": authorization})

    assert userinfo().json()["email"] == email
    revoked = requests.post(f"{webmail.service.url}/revoke", timeout=10, data={
        "token": access_token, "client_id": client["client_id"], "client_secret": client["client_secret"]})
    assert revoked.status_code == 200, revoked.text
    refused = userinfo()
    assert refused.status_code == 401, refused.text
    assert imap_subjects(webmail.dovecot.port, email, authorization) == [subject]
    assert introspections(webmail) == 0


def test_dovecot_refuses_a_jwt_naming_another_user_or_lacking_the_imap_scope(local_webmail):
    webmail = local_webmail
    alice_email = f"{webmail.service.unique('alice')}@example.org"
    bob_email = f"{webmail.service.unique('bob')}@example.org"
    alice, password = webmail.service.user(email=alice_email)
    webmail.service.user(email=bob_email)
    token = jwt_access_token(webmail, webmail.deliverer, alice, password, "imap")
    sender = webmail.service.client("--redirect-uri", DELIVERER_REDIRECT_URI, "--scope", "smtp",
                                    "--token-format", "jwt")
    smtp_only = jwt_access_token(webmail, sender, alice, password, "smtp")
    dovecot_log = log_size(webmail.dovecot.log_path)

    # Alice's token opens her mailbox, but not Bob's: its email claim is hers (username_attribute).
    with imap_session(webmail.dovecot.port, alice_email, f"Bearer {token}"):
        pass
    errors, refusal = imap_refusal(webmail.dovecot.port, bob_email, f"Bearer {token}")
    assert "AUTHENTICATIONFAILED" in refusal, refusal
    assert [error["status"] for error in errors] == ["401"], errors
    # A token the user granted an app for smtp alone does not read mail (scope = imap).
    errors, refusal = imap_refusal(webmail.dovecot.port, alice_email, f"Bearer {smtp_only}")
    assert "AUTHENTICATIONFAILED" in refusal, refusal
    assert [error["status"] for error in errors] == ["401"], errors

    # Dovecot's reasons, each found by itself.
    log = log_since(webmail.dovecot.log_path, dovecot_log, limit=10**7)
    assert f"Local validation failed: Username '{bob_email}' did not match '{alice_email}'" in log, log
    assert "Local validation failed: configured scope 'imap' missing from token scope 'smtp'" in log, log
    assert "introspection" not in log.lower(), log
    assert introspections(webmail) == 0


def test_a_jwt_signed_with_a_key_dovecot_lacks_is_refused_until_keys_dovecot_writes_it(local_webmail, browser):
    webmail = local_webmail
    exported = exported_keys(webmail.keys)
    # After one rotation the next key signs, which `keys dovecot` wrote already; after a second,
    # a key made since, which it has not. The restart makes it sign at once.
    webmail.service.cli("keys", "rotate")
    webmail.service.cli("keys", "rotate")
    restart(webmail)
    kid = signing_kid(webmail.service)
    assert f"ES256/{kid}" not in exported, exported
    email = f"{webmail.service.unique('rotated')}@example.org"
    username, password = webmail.service.user(email=email)
    dovecot_log = log_size(webmail.dovecot.log_path)
    sessions_before = set(session_authorizations(webmail.roundcube))

    sign_in_at_bearerbridge(browser, webmail, username, password)
    browser.find_element(By.ID, "approve").click()

    # Roundcube got its token, but Dovecot refused it, lacking its key: Roundcube's login page
    # says so, and no Roundcube session holds the token.
    wait = WebDriverWait(browser, WAIT)
    warning = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#messagestack .warning")))
    assert warning.text == "Login failed.", warning.text
    assert browser.find_element(By.ID, "rcmloginoauth").is_displayed()
    assert set(session_authorizations(webmail.roundcube)) == sessions_before
    log = log_since(webmail.dovecot.log_path, dovecot_log, limit=10**7)
    assert f"oauth2 failed: Local validation failed: ES256 key '{kid}' not found" in log, log
    assert f"Login: user=<{email}>" not in log, log

    # `keys dovecot` writes the new keys; Dovecot reads a key at its first use (it keeps no
    # memory of one it did not find), so it needs no reload to take a new one up.
    print(webmail.service.cli("keys", "dovecot", str(webmail.keys)))
    assert f"ES256/{kid}" in exported_keys(webmail.keys)
    assert exported <= exported_keys(webmail.keys)  # the retired keys stay while they are published
    subject = f"After the rotation {webmail.service.unique('subject')}"
    deliver(webmail, username, email, subject)
    dovecot_log = log_size(webmail.dovecot.log_path)

    # The same user again: bearerbridge remembers the sign-in and the consent, so Roundcube's
    # button leads straight back to Roundcube, which now opens the INBOX.
    browser.get(webmail.roundcube.url + "/")
    wait.until(EC.element_to_be_clickable((By.ID, "rcmloginoauth"))).click()
    inbox_row(browser, webmail, subject)
    wait_for_logins(webmail.dovecot, dovecot_log, email, "Local validation succeeded")
    new = set(session_authorizations(webmail.roundcube)) - sessions_before
    assert len(new) == 1, new
    header, claims = verified_jwt(webmail.service, new.pop().partition(" ")[2])
    assert (header["typ"], header["kid"], claims["email"]) == ("JWT", kid, email), (header, claims)
    assert introspections(webmail) == 0


def test_dovecot_trusts_a_key_it_has_read_until_doveadm_reload(local_webmail):
    """Why the snippet says `doveadm reload` after `keys dovecot`: a key file removed (as `keys
    dovecot` removes a key bearerbridge no longer publishes) still validates tokens in the auth
    process that read it, until a reload starts a new one."""
    webmail = local_webmail
    email = f"{webmail.service.unique('cached')}@example.org"
    username, password = webmail.service.user(email=email)
    authorization = f"Bearer {jwt_access_token(webmail, webmail.deliverer, username, password, 'imap')}"
    kid = verified_jwt(webmail.service, authorization.partition(" ")[2])[0]["kid"]
    key_file = webmail.keys / "default" / "ES256" / kid
    with imap_session(webmail.dovecot.port, email, authorization):
        pass  # Dovecot has read the key now

    key_file.unlink()
    with imap_session(webmail.dovecot.port, email, authorization):
        pass  # ... and keeps it
    doveadm_reload(webmail.dovecot)
    dovecot_log = log_size(webmail.dovecot.log_path)
    deadline = time.monotonic() + WAIT
    while True:  # the reload takes a moment; logins meanwhile may still reach the old auth process
        if imap_login(webmail.dovecot.port, email, authorization)[1] is not None:
            break
        assert time.monotonic() < deadline, log_since(webmail.dovecot.log_path, dovecot_log)
        time.sleep(0.2)
    assert f"Local validation failed: ES256 key '{kid}' not found" in log_since(
        webmail.dovecot.log_path, dovecot_log, limit=10**7)

    # `keys dovecot` puts the published key back, and it validates again.
    webmail.service.cli("keys", "dovecot", str(webmail.keys))
    assert key_file.is_file()
    with imap_session(webmail.dovecot.port, email, authorization):
        pass

"""Roundcube webmail signing a user in with bearerbridge (OpenID Connect, code grant) and reading
their mail from Dovecot with the access token it got, all real: Roundcube 1.6.5 running
conf/roundcube/config.inc.php, Dovecot running conf/dovecot (its oauth2 passdb asking
bearerbridge's RFC 7662 introspection), and a headless Chromium clicking through.

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
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from .peers import Dovecot, log_since, log_size, start_dovecot
from .peers_roundcube import DOCUMENT_ROOT, PHP, Roundcube, session_authorizations, start_roundcube
from .support import (
    Service,
    authorize_url,
    introspect,
    login_and_consent,
    missing,
    redirect_params,
    require_peer,
    token_request,
)
from .test_browser import start_chromium

pytestmark = pytest.mark.peer

WAIT = 20  # seconds, for every step of the browser and every IMAP exchange
SCOPE = "openid email imap"  # what conf/roundcube/config.inc.php asks for


@dataclass
class Webmail:
    service: Service
    dovecot: Dovecot
    roundcube: Roundcube
    client: dict  # Roundcube's, as registered
    resource_server: dict  # Dovecot's, which introspects
    deliverer: dict  # another app with the imap scope, which puts the test's messages in place

    def logs(self) -> dict[str, Path]:
        return {"bearerbridge": self.service.directory / "twistd.log", "dovecot": self.dovecot.log_path,
                **{f"roundcube {path.name}": path for path in
                   (self.roundcube.log_directory / "errors.log", self.roundcube.log_directory / "imap.log",
                    self.roundcube.directory / "php.out")}}


@pytest.fixture(scope="module")
def webmail(tmp_path_factory) -> Webmail:
    require_peer("/usr/sbin/dovecot")
    require_peer(PHP, "php")
    require_peer(str(DOCUMENT_ROOT / "index.php"))
    if os.geteuid() != 0:
        missing("the Dovecot peer runs as root (as CI does)")
    top = tmp_path_factory.mktemp("webmail")
    directories = {name: top / name for name in ("bearerbridge", "dovecot", "roundcube")}
    for directory in directories.values():
        directory.mkdir()
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
        deliverer = service.client("--redirect-uri", "https://deliver.example/cb", "--scope", "imap")
        yield Webmail(service, dovecot, roundcube, client, resource_server, deliverer)
    finally:
        for peer in reversed(started):
            peer.stop()


@pytest.fixture(autouse=True)
def peer_logs(webmail):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    offsets = {name: log_size(path) for name, path in webmail.logs().items()}
    yield
    for name, path in webmail.logs().items():
        print(f"----- {name} ({path}) during the test -----\n{log_since(path, offsets[name])}")


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ----------------------------------------------------------------------------------

def deliver(webmail: Webmail, username: str, email: str, subject: str) -> None:
    """Put a message in the user's INBOX with IMAP APPEND, through another app's token (not
    Roundcube's: what Roundcube shows comes from the mailbox, not from its own doing)."""
    message = EmailMessage()
    message["From"] = "Alice Example <alice@example.net>"
    message["To"] = email
    message["Subject"] = subject
    message["Date"] = "Fri, 04 Dec 2026 10:00:00 +0000"
    message.set_content("Hello from the Roundcube test.\n")
    token = webmail.service.issue(username, webmail.deliverer["client_id"], "imap")
    with imap_session(webmail.dovecot.port, email, f"Bearer {token}") as imap:
        status, data = imap.append("INBOX", "", imaplib.Time2Internaldate(time.time()), message.as_bytes())
        assert status == "OK", data


@contextlib.contextmanager
def imap_session(port: int, email: str, authorization: str):
    """An IMAP session logged in with XOAUTH2 as Roundcube logs in: `user=<email>` and
    `auth=<authorization>` ("<token_type> <access_token>")."""
    message = f"user={email}\x01auth={authorization}\x01\x01".encode()
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
    try:
        status, data = imap.authenticate("XOAUTH2", lambda challenge: message)
        assert status == "OK", data
        yield imap
    finally:
        imap.logout()


def imap_subjects(port: int, email: str, authorization: str) -> list[str]:
    """The subjects in the INBOX, read over IMAP with XOAUTH2."""
    with imap_session(port, email, authorization) as imap:
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        status, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK", data
        return [part[1].decode().strip().removeprefix("Subject: ") for part in data if isinstance(part, tuple)]


def sign_in_at_bearerbridge(browser, webmail: Webmail, username: str, password: str) -> None:
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


def dovecot_xoauth2_logins(dovecot: Dovecot, offset: int, email: str) -> list[str]:
    """The sessions of Dovecot's XOAUTH2 logins as `email` logged after `offset` whose token its
    oauth2 passdb introspected at bearerbridge successfully."""
    log = log_since(dovecot.log_path, offset, limit=10**7)
    sessions = re.findall(rf"imap-login: Info: Login: user=<{re.escape(email)}>, method=XOAUTH2, .* "
                          rf"session=<([^>]+)>", log)
    return [session for session in sessions
            if f"oauth2({email},127.0.0.1,<{session}>): Introspection succeeded" in log]


# -- the tests --------------------------------------------------------------------------------

def test_roundcube_signs_in_with_bearerbridge_and_opens_the_inbox_over_xoauth2(webmail, browser):
    email = f"{webmail.service.unique('reader')}@example.org"
    username, password = webmail.service.user(email=email)
    subject = f"Quarterly figures {webmail.service.unique('subject')}"
    deliver(webmail, username, email, subject)
    dovecot_log = log_size(webmail.dovecot.log_path)
    sessions_before = set(session_authorizations(webmail.roundcube))

    sign_in_at_bearerbridge(browser, webmail, username, password)
    browser.find_element(By.ID, "approve").click()

    # Roundcube redeems the code, logs in to Dovecot as the ID token's email, and lists the INBOX.
    wait = WebDriverWait(browser, WAIT)
    listed = (By.XPATH, f"//table[@id='messagelist']//tr[.//span[@class='subject']//span[text()='{subject}']]")
    warning = (By.CSS_SELECTOR, "#messagestack .warning")  # e.g. "Login failed." on its login page
    wait.until(EC.any_of(EC.visibility_of_element_located(listed), EC.visibility_of_element_located(warning)))
    assert not browser.find_elements(*warning), (browser.current_url, browser.find_element(*warning).text)
    row = browser.find_element(*listed)
    assert browser.current_url == f"{webmail.roundcube.url}/?_task=mail&_mbox=INBOX"
    sender = row.find_element(By.CLASS_NAME, "rcmContactAddress")
    assert (sender.text, sender.get_attribute("title")) == ("Alice Example", "alice@example.net")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messagelist tr.message")) == 1

    # Dovecot logged XOAUTH2 logins as the email, each token introspected at bearerbridge.
    deadline = time.monotonic() + WAIT
    while not dovecot_xoauth2_logins(webmail.dovecot, dovecot_log, email):
        assert time.monotonic() < deadline, log_since(webmail.dovecot.log_path, dovecot_log)
        time.sleep(0.1)

    # The credential Roundcube logs in with: "Bearer " and bearerbridge's access token for
    # Roundcube, the user and the scopes it asked for.
    new = set(session_authorizations(webmail.roundcube)) - sessions_before
    assert len(new) == 1, new
    authorization = new.pop()
    token_type, _, access_token = authorization.partition(" ")
    assert token_type == "Bearer", authorization
    answer = introspect(webmail.service, webmail.resource_server, access_token)
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

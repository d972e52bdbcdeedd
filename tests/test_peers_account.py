"""The user's own page against the real mail peers, end to end (issue 12's first required test).

One bearerbridge, a real Dovecot (IMAP checking tokens by introspection, and the doveadm HTTP API
as conf/dovecot/doveadm-http.conf sets it up) and a real Postfix (SMTP AUTH asking bearerbridge's
Dovecot-protocol socket). A user grants a mail app `imap smtp` through a real code grant; imaplib
logs in to Dovecot with XOAUTH2 from 127.0.0.2 and stays connected; smtplib logs in to Postfix with
XOAUTH2 from 127.0.0.3 and sends one message. In headless Chromium the user signs in at /account,
sees the app with its last use at imap (the address Dovecot names at introspection,
X-Dovecot-Auth-Remote) and at smtp (Postfix's `rip`), revokes it, and is told its live session was
ended: Dovecot sends the held imaplib connection BYE and closes it, and the same token logs in
neither to IMAP nor to SMTP any more. Screenshots of the page with both uses, at 1280 and 390 px,
go to $BEARERBRIDGE_SCREENSHOTS (else the test's directory).

Needs Debian's postfix, dovecot-imapd, chromium and chromedriver (scripts/install-peers) and root;
skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import os
import smtplib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .peer_setup import (
    DoveadmApi,
    MailPeers,
    StartedPeers,
    logs_printed,
    peer_directories,
    require_peers_as_root,
    start_dovecot_asking,
)
from .peers import start_postfix, wait_for_sasl
from .support import Service, exchange_code, free_port, get_code, wait_for
from .test_peers_mail import SMTP_OK, smtp_auth, xoauth2
from .test_peers_revoke import close, ended_by_dovecot, logged_in, refused

pytestmark = pytest.mark.peer

WAIT = 10  # seconds: the bound on every exchange and page
WRITTEN = 5.0 + 3  # seconds: uses.FLUSH_EVERY, and slack, before the page must show a use
REDIRECT_URI = "https://app.example/cb"
IMAP_FROM, SMTP_FROM = "127.0.0.2", "127.0.0.3"  # the mail clients' addresses, as the page must show them
WIDTHS = (1280, 390)  # px: a desktop and a phone


@dataclass
class Mail(MailPeers):
    app: dict  # a confidential client asking for imap and smtp


@pytest.fixture(scope="module")
def mail(tmp_path_factory) -> Mail:
    require_peers_as_root("/usr/sbin/postfix", "/usr/sbin/dovecot")
    top = tmp_path_factory.mktemp("account")
    directories = peer_directories(top, "bearerbridge", "postfix", "dovecot")
    doveadm, sasl_port = DoveadmApi.keyed(top), free_port()
    with StartedPeers() as started:
        service = started(Service.start(directories["bearerbridge"], extra=f"""
[sasl]
listen = ["tcp:{sasl_port}:interface=127.0.0.1"]
[sasl.services]
smtp = "smtp"
imap = "imap"
""" + doveadm.bearerbridge_conf()))
        wait_for_sasl(service, sasl_port)
        # Relayed mail is discarded (logged as sent): the test needs Postfix to accept it, not the
        # Internet to receive it.
        postfix = started(start_postfix(directories["postfix"], f"inet:127.0.0.1:{sasl_port}",
                                        overrides={"default_transport": "discard:bearerbridge test"}))
        dovecot = started(start_dovecot_asking(service, directories["dovecot"], extra_conf=doveadm.dovecot_conf()))
        doveadm.wait_until_listening(WAIT)
        app = service.client("--name", "Mail App", "--redirect-uri", REDIRECT_URI, "--scope", "imap smtp")
        yield Mail(service, postfix, dovecot, app)


@pytest.fixture(autouse=True)
def peer_logs(mail):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    with logs_printed(mail.logs()):
        yield


def send_one_message(mail: Mail, user: str, token: str) -> None:
    """SMTP AUTH XOAUTH2 through Postfix from SMTP_FROM, then one message relayed."""
    with smtplib.SMTP("127.0.0.1", mail.postfix.port, local_hostname="client.example", timeout=WAIT,
                      source_address=(SMTP_FROM, 0)) as smtp:
        smtp.ehlo()
        assert smtp.auth("XOAUTH2", lambda challenge=None: xoauth2(user, token).decode()) == SMTP_OK
        message = (f"From: <{user}@example.org>\r\nTo: <someone@example.net>\r\nSubject: hello\r\n\r\n"
                   "Sent with a token.\r\n")
        assert smtp.sendmail(f"<{user}@example.org>", ["<someone@example.net>"], message) == {}
    wait_for(lambda: f"sasl_method=XOAUTH2, sasl_username={user}" in mail.postfix.log(), timeout=WAIT,
             what="Postfix to log the SASL login")


def uses_shown(browser, client_id: str) -> dict[str, str]:
    """The app's "Last used" lines on the page, by service."""
    from selenium.webdriver.common.by import By

    lines = [li.text for li in browser.find_elements(By.CSS_SELECTOR, f"#app-{client_id} ul.uses li")]
    return {line.split(" ", 1)[0]: line for line in lines}


def screenshots(browser, name: str, directory: Path) -> list[Path]:
    """The whole page at each of WIDTHS, as PNG files in `directory`: the viewport set through the
    DevTools protocol (a window's size would include the browser's own frame), narrow as a phone's."""
    directory.mkdir(parents=True, exist_ok=True)
    shots = []
    try:
        for width in WIDTHS:
            metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600}
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": height})
            shot = directory / f"{name}-{width}.png"
            assert browser.save_screenshot(str(shot))
            assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            shots.append(shot)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return shots


def test_the_user_sees_imap_and_smtp_use_revokes_and_the_live_imap_session_ends(mail, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from .chromium import sign_in

    user, password = mail.service.user()
    code, verifier = get_code(mail.service, mail.app, user, password, scope="imap smtp")
    answer = exchange_code(mail.service, mail.app, code, verifier, REDIRECT_URI)
    assert answer.status_code == 200, answer.text
    assert answer.json()["scope"] == "imap smtp"
    token = answer.json()["access_token"]

    live = logged_in(mail.dovecot.port, user, token, IMAP_FROM)  # held open until Dovecot ends it
    try:
        send_one_message(mail, user, token)

        browser.get(f"{mail.service.url}/account")
        sign_in(browser, user, password, WAIT)
        wait = WebDriverWait(browser, WAIT)
        client_id = mail.app["client_id"]
        wait.until(EC.presence_of_element_located((By.ID, f"app-{client_id}")))
        assert "Mail App" in browser.find_element(By.ID, f"app-{client_id}").text

        deadline = time.monotonic() + WRITTEN  # the uses are written behind, every 5 s
        while not {"imap", "smtp"} <= set(uses_shown(browser, client_id)):
            assert time.monotonic() < deadline, browser.find_element(By.ID, f"app-{client_id}").text
            time.sleep(0.5)
            browser.refresh()
        shown = uses_shown(browser, client_id)
        assert shown["imap"].endswith(f"from {IMAP_FROM}"), shown  # Dovecot's X-Dovecot-Auth-Remote
        assert shown["smtp"].endswith(f"from {SMTP_FROM}"), shown  # Postfix's rip
        screenshots(browser, "account-uses", Path(os.environ.get("BEARERBRIDGE_SCREENSHOTS") or tmp_path))

        browser.find_element(By.ID, f"revoke-{client_id}").click()
        wait.until(EC.presence_of_element_located((By.ID, "notice")))
        # The kick is narrowed to where the grant was last used at imap: the held session's address.
        assert browser.find_element(By.ID, "notice").text == (
            "Access revoked: the app's tokens no longer work, and it must ask you again before it gets any. "
            "Ended 1 live mail session(s) open from where it was last used.")
        assert not browser.find_elements(By.ID, f"app-{client_id}")
        ended_by_dovecot(live)
    finally:
        close(live)

    refused(mail.dovecot.port, user, token)
    attempt = smtp_auth(mail.postfix.port, "XOAUTH2", xoauth2(user, token))
    assert (attempt.code, attempt.challenges) == (535, [{"status": "invalid_token", "schemes": "bearer"}]), attempt

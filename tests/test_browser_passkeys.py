"""Passkeys clicked in a real headless Chromium with Selenium's virtual authenticator (CTAP2,
internal, resident keys, user verification) against a real `twistd bearerbridge` whose issuer is
http://localhost:PORT (Chromium refuses WebAuthn on http://127.0.0.1: the RP ID must be a host
name). Add a passkey on /account/passkeys, sign out, sign in at /authorize with the password and
then the passkey, and again with the passkey alone; each time a real code grant, whose ID token's
amr says what was used. Then the passkey alone on every other sign-in page: /account (the account
page), /admin (the admin's home; 403 once they are no admin), /device (a device grant approved and
its token polled). Last, the passkey removed on /account/passkeys (with the password) but still in
the authenticator: signing in with it is refused, 401, and starts no session. The pages are
photographed at 1280 and 390 px into /tmp/passkey-shots/ (or $PASSKEY_SHOTS)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import requests
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import Protocol, Transport, VirtualAuthenticatorOptions
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from . import chromium
from .support import Service, authorize_url, exchange_code, free_port, introspect, pkce_pair
from .test_browser import WAIT, Callback

SHOTS = Path(os.environ.get("PASSKEY_SHOTS", "/tmp/passkey-shots"))
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def photograph(browser, name: str) -> None:
    """The whole page at a desktop's width and a phone's into SHOTS."""
    chromium.photograph(browser, SHOTS, name)


@pytest.fixture
def localhost_service(tmp_path_factory):
    port = free_port()
    running = Service.start(tmp_path_factory.mktemp("passkeys"), url=f"http://localhost:{port}",
                            listen=[f"tcp:{port}:interface=127.0.0.1"])
    yield running
    running.stop()


def claims(id_token: str) -> dict:
    payload = id_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def code_grant(browser, service, client, callback, sign_in) -> dict:
    """Open /authorize, sign in with `sign_in(wait)`, approve if asked, and exchange the code: the ID token's claims."""
    wait = WebDriverWait(browser, WAIT)
    callback.queries.clear()
    callback.received.clear()
    verifier, challenge = pkce_pair()
    browser.get(authorize_url(service.url, client["client_id"], callback.uri, challenge, "openid imap",
                              nonce="n-" + verifier[:8]))
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    sign_in(wait)
    wait.until(lambda b: b.current_url.startswith(callback.uri) or b.find_elements(By.ID, "approve"))
    if not browser.current_url.startswith(callback.uri):
        browser.find_element(By.ID, "approve").click()
        wait.until(lambda b: b.current_url.startswith(callback.uri))
    assert callback.received.wait(WAIT)
    code = callback.queries[-1]["code"]
    answer = exchange_code(service, client, code, verifier, redirect_uri=callback.uri)
    assert answer.status_code == 200, answer.text
    return claims(answer.json()["id_token"])


def sign_out(browser, service) -> None:
    """Forget the browser's cookies for the service (they are per host: load one of its pages first)."""
    browser.get(service.url + "/healthz")
    browser.delete_all_cookies()


def sign_in_with_passkey(browser, url: str) -> None:
    """Open `url`, a sign-in page, and click "Sign in with a passkey" (the authenticator answers)."""
    browser.get(url)
    WebDriverWait(browser, WAIT).until(EC.element_to_be_clickable((By.ID, "passkey-sign-in"))).click()


def shown(browser, element_id: str) -> str:
    """The text of the element with this id once it is visible; failing with the page shown instead."""
    try:
        return WebDriverWait(browser, WAIT).until(EC.visibility_of_element_located((By.ID, element_id))).text
    except TimeoutException:
        pass  # failed below, out of the handler: the page says more than Selenium's timeout
    main = browser.find_elements(By.TAG_NAME, "main")
    pytest.fail(f"no #{element_id} within {WAIT} s on {browser.current_url} (HTTP {status(browser)}): "
                f"{(main[0].text if main else browser.page_source)[:300]!r}")


def status(browser) -> int:
    """The HTTP status of the page shown (of the POST, after a form was posted)."""
    return browser.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")


def test_add_a_passkey_then_sign_in_with_it_on_every_sign_in_page_until_it_is_removed(localhost_service, browser):
    service = localhost_service
    username, password = service.user()
    authenticator = VirtualAuthenticatorOptions(
        protocol=Protocol.CTAP2, transport=Transport.INTERNAL, has_resident_key=True, has_user_verification=True,
        is_user_verified=True, is_user_consenting=True)
    browser.add_virtual_authenticator(authenticator)
    wait = WebDriverWait(browser, WAIT)

    browser.get(service.url + "/account")
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    assert browser.find_element(By.ID, "passkey-sign-in").is_displayed()  # the script found WebAuthn
    chromium.sign_in(browser, username, password, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "passkeys-link"))).click()
    wait.until(EC.element_to_be_clickable((By.ID, "add-passkey")))
    assert browser.find_element(By.ID, "no-passkeys")
    photograph(browser, "passkeys-empty")
    browser.find_element(By.ID, "passkey-name").send_keys("Test laptop")
    browser.find_element(By.ID, "add-passkey").click()
    notice = wait.until(EC.presence_of_element_located((By.ID, "notice"))).text
    assert "Test laptop" in notice, notice
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".passkey-name")]
    assert names == ["Test laptop"]
    assert browser.find_element(By.CSS_SELECTOR, ".passkey-used").text == "never"
    credentials = browser.get_credentials()
    assert len(credentials) == 1 and credentials[0].is_resident_credential
    photograph(browser, "passkeys-one")

    callback = Callback()
    try:
        client = service.client("--redirect-uri", callback.uri, "--scope", "openid imap")
        browser.delete_all_cookies()  # signed out

        def password_then_passkey(wait):
            photograph(browser, "login")
            chromium.sign_in(browser, username, password, WAIT)
            wait.until(EC.element_to_be_clickable((By.ID, "use-passkey")))
            assert "use your passkey" in browser.find_element(By.TAG_NAME, "main").text
            photograph(browser, "second-step")
            browser.find_element(By.ID, "use-passkey").click()
        first = code_grant(browser, service, client, callback, password_then_passkey)
        assert first["amr"] == ["pwd", "hwk", "user", "mfa"], first

        browser.get(service.url + "/account")  # cookies are per host: the callback's are 127.0.0.1's
        browser.delete_all_cookies()

        def passkey_alone(wait):
            browser.find_element(By.ID, "passkey-sign-in").click()
        second = code_grant(browser, service, client, callback, passkey_alone)
        assert second["amr"] == ["hwk", "user", "mfa"], second
        assert second["sub"] == first["sub"]
    finally:
        callback.close()

    browser.get(service.url + "/account/passkeys")  # the session of the passkey alone
    used = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".passkey-used"))).text
    assert used != "never" and used.endswith("UTC"), used
    photograph(browser, "passkeys-used")

    the_passkey_alone_signs_in_on_the_other_pages(browser, service, username)
    a_removed_passkey_is_refused(browser, service, password)


def the_passkey_alone_signs_in_on_the_other_pages(browser, service, username: str) -> None:
    """/account, /admin (as an admin, then as no admin: 403) and /device, each signed out first."""
    sign_out(browser, service)
    sign_in_with_passkey(browser, service.url + "/account")
    assert shown(browser, "account-user") == username

    service.cli("user", "admin", username, "--admin")  # already, as the first user; said here
    sign_out(browser, service)
    sign_in_with_passkey(browser, service.url + "/admin")
    assert shown(browser, "admin-user") == username
    service.cli("user", "admin", username, "--no-admin")
    sign_out(browser, service)
    sign_in_with_passkey(browser, service.url + "/admin")
    assert "Only an admin may see this page." in shown(browser, "forbidden")
    assert status(browser) == 403

    tv = service.client("--public", "--grant", "device_code", "--scope", "imap")
    started = requests.post(f"{service.url}/device_authorization", data={"client_id": tv["client_id"],
                                                                         "scope": "imap"}, timeout=10)
    assert started.status_code == 200, started.text
    started = started.json()
    sign_out(browser, service)
    sign_in_with_passkey(browser, started["verification_uri_complete"])
    shown(browser, "user_code")  # the code page, as the one signed in
    assert browser.find_element(By.ID, "user_code").get_attribute("value") == started["user_code"]
    browser.find_element(By.ID, "continue").click()
    shown(browser, "approve")
    browser.find_element(By.ID, "approve").click()
    shown(browser, "device-approved")
    tokens = requests.post(f"{service.url}/token", data={"grant_type": DEVICE_GRANT, "client_id": tv["client_id"],
                                                          "device_code": started["device_code"]}, timeout=10)
    assert tokens.status_code == 200, tokens.text
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    assert introspect(service, resource_server, tokens.json()["access_token"])["username"] == username


def a_removed_passkey_is_refused(browser, service, password: str) -> None:
    """Remove the passkey on /account/passkeys (the password confirms it), keep it in the
    authenticator, and sign in with it: refused (401, the sign-in form again), and no session."""
    wait = WebDriverWait(browser, WAIT)
    browser.get(service.url + "/account/passkeys")  # the session of /device's sign-in, a recent one
    remove = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "details.remove")))
    remove.find_element(By.TAG_NAME, "summary").click()
    remove.find_element(By.CSS_SELECTOR, ".remove-proof").send_keys(password)
    remove.find_element(By.CSS_SELECTOR, ".remove-passkey").click()
    assert "Test laptop" in shown(browser, "notice")
    assert browser.find_element(By.ID, "no-passkeys")
    assert len(browser.get_credentials()) == 1  # the authenticator still has it

    sign_out(browser, service)
    sign_in_with_passkey(browser, service.url + "/account")
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "main p.error"))
    assert status(browser) == 401
    assert browser.find_element(By.CSS_SELECTOR, "main p.error").is_displayed()
    assert browser.find_element(By.ID, "sign-in").is_displayed() and not browser.find_elements(By.ID, "account-user")
    photograph(browser, "passkey-refused")
    refused = [json.loads(line) for line in (service.directory / "var" / "audit.log").read_text().splitlines()]
    refused = [e for e in refused if e["event"] == "sign_in_failed" and e.get("reason") == "passkey"]
    assert [e.get("detail") for e in refused] == ["unknown passkey"], refused

    browser.get(service.url + "/account")
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    assert not browser.find_elements(By.ID, "account-user")

"""Passkeys clicked in a real headless Chromium with Selenium's virtual authenticator (CTAP2,
internal, resident keys, user verification) against a real `twistd bearerbridge` whose issuer is
http://localhost:PORT (Chromium refuses WebAuthn on http://127.0.0.1: the RP ID must be a host
name). Add a passkey on /account/passkeys, sign out, sign in at /authorize with the password and
then the passkey, and again with the passkey alone; each time a real code grant, whose ID token's
amr says what was used. The pages are photographed at 1280 and 390 px into /tmp/passkey-shots/
(or $PASSKEY_SHOTS)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import Protocol, Transport, VirtualAuthenticatorOptions
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from . import chromium
from .support import Service, authorize_url, exchange_code, free_port, pkce_pair
from .test_browser import WAIT, Callback

SHOTS = Path(os.environ.get("PASSKEY_SHOTS", "/tmp/passkey-shots"))


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


def test_add_a_passkey_then_sign_in_with_and_without_a_password(localhost_service, browser):
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

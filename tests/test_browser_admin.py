"""/admin clicked in a real headless Chromium against a real `twistd bearerbridge`: an admin (made
with `bearerbridge user add --admin`) registers a client on the page, and that very client then
completes a code grant for another user; the client's page counts the user who granted it; a
user who is no admin gets 403. The pages are photographed at 1280 and 390 px wide into
/tmp/admin-shots/ (or $ADMIN_SHOTS)."""

from __future__ import annotations

import os
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from . import test_browser, test_browser_two_factor
from .support import authorize_url, pkce_pair, token_request
from .test_browser import WAIT, landed

SHOTS = Path(os.environ.get("ADMIN_SHOTS", "/tmp/admin-shots"))
PASSWORD = "correct horse battery"
callback = test_browser.callback  # the fixture of the redirect URI's server


def sign_in(browser, username: str, password: str = PASSWORD) -> None:
    wait = WebDriverWait(browser, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()


def shown(browser, element_id: str) -> str:
    return WebDriverWait(browser, WAIT).until(EC.visibility_of_element_located((By.ID, element_id))).text


def test_a_client_registered_on_the_admin_page_completes_a_code_grant_in_chromium(service, browser, callback,
                                                                                   monkeypatch):
    monkeypatch.setattr(test_browser_two_factor, "SHOTS", SHOTS)  # its photograph(), into our directory
    photograph = test_browser_two_factor.photograph
    admin = service.unique("admin")
    service.cli("user", "add", admin, "--admin", "--email", f"{admin}@example.org", "--password-stdin",
                stdin=PASSWORD + "\n")
    browser.get(f"{service.url}/admin")
    photograph(browser, "admin-sign-in")
    sign_in(browser, admin)
    assert shown(browser, "admin-user") == admin
    browser.find_element(By.ID, "register-client").click()
    shown(browser, "client-form")
    name = service.unique("Webmail")
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "redirect-uris").send_keys(callback.uri)
    for scope in ("openid", "profile", "email", "xmpp"):
        browser.find_element(By.ID, f"scope-{scope}").click()  # unchecked: it keeps to mail and files
    photograph(browser, "admin-client-new")
    browser.find_element(By.ID, "register").click()
    client = {"client_id": shown(browser, "client-id"), "client_secret": shown(browser, "client-secret")}
    photograph(browser, "admin-secret")

    browser.delete_all_cookies()  # another person, in another browser
    user, password = service.user()
    verifier, challenge = pkce_pair()
    browser.get(authorize_url(service.url, client["client_id"], callback.uri, challenge, "imap smtp",
                              state="admin-1"))
    assert name in browser.find_element(By.TAG_NAME, "main").text
    sign_in(browser, user, password)
    WebDriverWait(browser, WAIT).until(EC.element_to_be_clickable((By.ID, "approve"))).click()
    params = landed(browser, callback)
    assert params["state"] == "admin-1" and params["iss"] == service.url
    response = token_request(service, {"grant_type": "authorization_code", "code": params["code"],
                                       "redirect_uri": callback.uri, "code_verifier": verifier}, client)
    assert response.status_code == 200 and response.json()["scope"] == "imap smtp", response.text

    browser.delete_all_cookies()
    browser.get(f"{service.url}/admin/clients/{client['client_id']}")
    sign_in(browser, admin)
    assert shown(browser, "granted") == "1"
    photograph(browser, "admin-client")
    browser.find_element(By.ID, "delete").click()
    shown(browser, "confirm-delete")
    photograph(browser, "admin-client-delete")
    browser.find_element(By.ID, "admin-home").click()
    shown(browser, f"client-{client['client_id']}")
    photograph(browser, "admin")
    browser.find_element(By.LINK_TEXT, user).click()
    assert name in shown(browser, "grants")
    photograph(browser, "admin-user")
    browser.get(f"{service.url}/admin/users/new")
    shown(browser, "user-form")
    photograph(browser, "admin-user-new")

    browser.delete_all_cookies()
    browser.get(f"{service.url}/admin")
    sign_in(browser, user, password)
    assert "Only an admin may see this page." in shown(browser, "forbidden")
    photograph(browser, "admin-forbidden")

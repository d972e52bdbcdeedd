"""Two-factor sign-in clicked in a real headless Chromium against a real `twistd bearerbridge`:
turn it on at /account/two-factor (the secret read off the page, as a person types it into an
app), then sign in at /authorize with a TOTP code from pyotp and reach the consent page. The
pages are photographed at 1280 and 390 px wide into /tmp/2fa-shots/ (or $TWO_FACTOR_SHOTS)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pyotp
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from . import chromium
from .support import authorize_url, pkce_pair
from .test_browser import WAIT

SHOTS = Path(os.environ.get("TWO_FACTOR_SHOTS", "/tmp/2fa-shots"))


def photograph(browser, name: str) -> None:
    """The whole page at a desktop's width and a phone's into SHOTS (read at each call:
    tests/test_browser_admin.py points it at its own directory)."""
    chromium.photograph(browser, SHOTS, name)


def code_of_step(secret: str, offset: int) -> str:
    """The code of the time step `offset` steps from now (one either side is accepted, each step
    once), taken away from a step's end so that the step does not change before it is sent."""
    while time.time() % 30 > 25:
        time.sleep(0.2)
    return pyotp.TOTP(secret).at(time.time() + 30 * offset)


def test_enrol_then_sign_in_with_a_code_in_chromium(service, browser):
    username, password = service.user()
    wait = WebDriverWait(browser, WAIT)
    browser.get(service.url + "/account/two-factor")  # without a session: /account's sign-in
    chromium.sign_in(browser, username, password, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "two-factor-link"))).click()
    wait.until(EC.element_to_be_clickable((By.ID, "begin"))).click()

    secret_text = wait.until(EC.presence_of_element_located((By.ID, "secret"))).text
    qr = browser.find_element(By.CSS_SELECTOR, ".qr-box svg")
    assert qr.size["width"] >= 150 and qr.size["width"] == qr.size["height"], qr.size  # drawn, and square
    photograph(browser, "enrol")
    secret = secret_text.replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), secret_text
    # The previous step's code (as from an app whose clock is a little behind), so that the sign-in
    # below may use the current one without waiting for the next step.
    browser.find_element(By.ID, "code").send_keys(code_of_step(secret, -1))
    browser.find_element(By.ID, "confirm").click()
    wait.until(EC.presence_of_element_located((By.ID, "recovery-codes")))
    codes = [li.text for li in browser.find_elements(By.CSS_SELECTOR, ".recovery-codes li")]
    assert len(codes) == 10 and all(re.fullmatch(r"[a-z2-9]{5}-[a-z2-9]{5}", c) for c in codes), codes
    photograph(browser, "recovery-codes")
    browser.find_element(By.ID, "saved").click()
    left = wait.until(EC.presence_of_element_located((By.ID, "recovery-left")))
    assert left.text == "10"
    photograph(browser, "manage")
    browser.find_element(By.ID, "back").click()
    assert wait.until(EC.presence_of_element_located((By.ID, "two-factor-state"))).text == "On"
    photograph(browser, "account")

    browser.delete_all_cookies()  # another day, or another browser: signed out
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    _, challenge = pkce_pair()
    browser.get(authorize_url(service.url, client["client_id"], "https://app.example/cb", challenge, "imap"))
    chromium.sign_in(browser, username, password, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "verify")))
    assert browser.switch_to.active_element == browser.find_element(By.ID, "code")  # what is left to type
    assert client["name"] in browser.find_element(By.TAG_NAME, "main").text
    photograph(browser, "code-step")
    browser.find_element(By.ID, "code").send_keys(code_of_step(secret, 0))
    browser.find_element(By.ID, "verify").click()
    wait.until(EC.element_to_be_clickable((By.ID, "approve")))
    main = browser.find_element(By.TAG_NAME, "main").text
    assert username in main and client["name"] in main

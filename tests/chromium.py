"""What the tests driving a real headless Chromium (Selenium; tests/conftest.py's `browser`) do
alike: sign in through bearerbridge's sign-in form, and photograph a page at a desktop's width
and a phone's."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

WIDTHS = (1280, 390)  # px: a desktop and a phone


def sign_in(browser, username: str, password: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for the page's sign-in form (/account's, /authorize's), fill in
    the user name and password, and submit it."""
    WebDriverWait(browser, timeout).until(EC.element_to_be_clickable((By.ID, "sign-in")))
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()


def photograph(browser, directory: Path, name: str) -> None:
    """The whole page at each of WIDTHS, the window as tall as the page, into
    `directory`/`name`-WIDTH.png; the window is 1024 × 768 again after."""
    directory.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        browser.set_window_size(width, 800)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(width, max(800, height + 140))  # the window's frame takes some
        assert browser.save_screenshot(str(directory / f"{name}-{width}.png"))
    browser.set_window_size(1024, 768)

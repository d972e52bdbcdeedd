"""Login and consent clicked in a real headless Chromium (Debian's, through chromedriver and Selenium)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

# selenium is a test dependency: a missing one must fail the run, not skip it.
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeDriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from .support import authorize_url, pkce_pair, require_peer, token_request

WAIT = 20  # seconds, for every step of the browser
CALLBACK = "/callback"


class Callback:
    """A loopback HTTP server standing in for the client's redirect URI; records what it receives."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        self.received = threading.Event()
        callback = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path != CALLBACK:  # e.g. the browser's /favicon.ico
                    self.send_error(404)
                    return
                callback.queries.append({k: v[0] for k, v in parse_qs(parts.query).items()})
                callback.received.set()
                body = b"done"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        # threading: the browser may open speculative connections that never carry a request
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_port}{CALLBACK}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="redirect-uri", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def callback():
    server = Callback()
    yield server
    server.close()


def start_chromium(profile: Path, *extra_args: str) -> webdriver.Chrome:
    chromium = require_peer("/usr/bin/chromium", "chromium")
    chromedriver = require_peer("/usr/bin/chromedriver", "chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1024,768", f"--user-data-dir={profile / 'chromium-profile'}",
                *extra_args):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=ChromeDriverService(chromedriver, log_output=str(profile / "chromedriver.log")))
    driver.set_page_load_timeout(WAIT)
    return driver


def sign_in(browser, service, client: dict, redirect_uri: str, challenge: str, state: str) -> None:
    """Open the authorization URL, sign in through the login form, and wait for the consent page."""
    username, password = service.user()
    browser.get(authorize_url(service.url, client["client_id"], redirect_uri, challenge, "imap smtp", state=state))
    wait = WebDriverWait(browser, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    assert client["name"] in browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(EC.element_to_be_clickable((By.ID, "approve")))
    assert username in browser.find_element(By.TAG_NAME, "main").text


def landed(browser, callback: Callback) -> dict[str, str]:
    """Wait for the browser to arrive at the redirect URI; the query string the server there received."""
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(callback.uri))
    assert callback.received.wait(WAIT), "the redirect URI was never requested"
    WebDriverWait(browser, WAIT).until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "done"))
    assert len(callback.queries) == 1, callback.queries
    return callback.queries[0]


def test_login_and_consent_in_chromium(service, browser, callback, tmp_path):
    client = service.client("--redirect-uri", callback.uri, "--scope", "imap smtp")
    verifier, challenge = pkce_pair()
    sign_in(browser, service, client, callback.uri, challenge, state="browser-state-1")

    consent = browser.find_element(By.TAG_NAME, "main").text
    assert client["name"] in consent
    assert "Read and manage your mail (IMAP)" in consent
    assert "Send mail as you (SMTP)" in consent
    shot = tmp_path / "consent.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 0 and shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    browser.find_element(By.ID, "approve").click()
    params = landed(browser, callback)
    assert params["state"] == "browser-state-1"
    assert params["iss"] == service.url
    assert params["code"]
    assert "error" not in params

    response = token_request(service, {"grant_type": "authorization_code", "code": params["code"],
                                       "redirect_uri": callback.uri, "code_verifier": verifier}, client)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["access_token"] and tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "imap smtp"


def test_deny_in_chromium(service, browser, callback):
    client = service.client("--redirect-uri", callback.uri, "--scope", "imap smtp")
    verifier, challenge = pkce_pair()
    sign_in(browser, service, client, callback.uri, challenge, state="browser-state-2")

    browser.find_element(By.ID, "deny").click()
    params = landed(browser, callback)
    assert params["error"] == "access_denied"
    assert params["state"] == "browser-state-2"
    assert "code" not in params


class Attacker:
    """A server standing in for evil.example (Chromium maps the name to it): records every request."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/favicon.ico":  # the browser's own, after any page
                    attacker.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"stolen")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, name="evil.example", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_loopback_redirect_chromium_reads_as_another_host_never_gets_a_code(service, callback, tmp_path):
    """Python's urlsplit reads `http://evil.example\\@127.0.0.1:PORT/cb` as loopback; Chromium, by the
    WHATWG URL rules, as evil.example. With consent remembered, accepting it would hand the code
    to evil.example with no page shown, and its owner would redeem it with their own verifier."""
    attacker = Attacker()
    driver = start_chromium(tmp_path, f"--host-resolver-rules=MAP evil.example 127.0.0.1:{attacker.port}")
    try:
        client = service.client("--public", "--redirect-uri", "http://127.0.0.1/callback", "--scope", "imap smtp")
        _, challenge = pkce_pair()
        sign_in(driver, service, client, callback.uri, challenge, state="first")
        driver.find_element(By.ID, "approve").click()
        assert landed(driver, callback)["code"]  # alice's consent is remembered from now on

        port = urlsplit(callback.uri).port
        # The control: Chromium itself sends such a URL to evil.example.
        driver.get(f"http://evil.example\\@127.0.0.1:{port}/callback?code=control")
        assert attacker.paths == [f"/@127.0.0.1:{port}/callback?code=control"]
        attacker.paths.clear()

        for variant in (f"http://evil.example\\@127.0.0.1:{port}/callback",
                        f"http://evil.example%5C@127.0.0.1:{port}/callback",
                        f"http://evil.example@127.0.0.1:{port}/callback",
                        f"http://evil.example\t@127.0.0.1:{port}/callback",
                        f"http://127.0.0.1:{port}\\@evil.example/callback"):
            driver.get(authorize_url(service.url, client["client_id"], variant, challenge, "imap smtp"))
            WebDriverWait(driver, WAIT).until(EC.presence_of_element_located((By.ID, "error")))
            assert driver.current_url.startswith(service.url + "/authorize"), variant
            assert driver.find_element(By.ID, "error").text == "invalid_request", variant
        time.sleep(0.3)  # anything on its way to evil.example would have arrived
        assert attacker.paths == []
        assert len(callback.queries) == 1  # and nothing more reached the app's own port either
    finally:
        driver.quit()
        attacker.close()


def test_an_app_without_a_redirect_gets_its_code_on_a_page_to_copy(service, browser):
    """The out-of-band redirect (Prosody's and Doorkeeper's apps): the user signs in with the
    user name filled in from login_hint, approves, and reads the code off the page; the app
    exchanges what was copied."""
    username, password = service.user()
    client = service.client("--redirect-uri", "urn:ietf:wg:oauth:2.0:oob", "--scope", "imap")
    verifier, challenge = pkce_pair()
    browser.get(authorize_url(service.url, client["client_id"], "urn:ietf:wg:oauth:2.0:oob", challenge, "imap",
                              login_hint=username))
    wait = WebDriverWait(browser, WAIT)
    wait.until(EC.element_to_be_clickable((By.ID, "sign-in")))
    assert browser.find_element(By.ID, "username").get_attribute("value") == username
    assert browser.switch_to.active_element == browser.find_element(By.ID, "password")  # what is left to type
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(EC.element_to_be_clickable((By.ID, "approve"))).click()
    code = wait.until(EC.presence_of_element_located((By.ID, "code"))).get_attribute("value")
    assert browser.current_url.startswith(service.url) and "copy this code" in browser.find_element(
        By.TAG_NAME, "main").text
    response = token_request(service, {"grant_type": "authorization_code", "code": code,
                                       "redirect_uri": "urn:ietf:wg:oauth:2.0:oob", "code_verifier": verifier}, client)
    assert response.status_code == 200 and response.json()["scope"] == "imap", response.text

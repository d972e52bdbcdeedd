"""Apache's mod_auth_openidc as an OpenID Connect relying party of bearerbridge, in a real Chromium.

A headless Chromium asks Apache (tests/peers_apache.py) for a protected page; mod_auth_openidc
sends it to bearerbridge with PKCE S256, state and a nonce; the user signs in and consents; Apache
redeems the code (client_secret_basic), checks the ID token's signature against the /jwks it
fetched, its iss, aud, exp and nonce, asks /userinfo, and shows the page, which prints what Apache
made of the user. Proved here:
- a user signs in at Apache with an ES256 client and with an RS256 client (`--id-token-alg`):
  Apache's REMOTE_USER is the user's preferred_username, the email comes along, `sub` is opaque;
- across `bearerbridge keys rotate` and a restart of bearerbridge, the SAME Apache process accepts
  an ID token signed by the new key (another kid) with the JWKS it fetched before the rotation,
  which already published that key; it never fetches the JWKS again;
- a user who denies consent sees Apache's error page, never the protected page, and gets no
  session at Apache.

Needs Debian's apache2, libapache2-mod-auth-openidc, chromium and chromium-driver
(scripts/install-peers); skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import requests
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from .peers import log_size
from .peers_apache import APACHE, OPENIDC_MODULE, REDIRECT_PATH, Apache, query, redirect_uri, start_apache
from .support import Service, free_port, require_peer
from .test_browser import WAIT, start_chromium

pytestmark = pytest.mark.peer

SCOPE = "openid profile email"
SHOWN = ("remote-user", "preferred-username", "email", "sub", "id-token", "userinfo")  # ids on Apache's page


@pytest.fixture
def start_rp(tmp_path) -> Callable[..., tuple[dict, Apache]]:
    """Register a client of `service` for a new Apache, and start that Apache as the client."""
    require_peer("apache2", APACHE)
    require_peer(str(OPENIDC_MODULE))
    started: list[Apache] = []

    def start(service: Service, *client_args: str) -> tuple[dict, Apache]:
        port = free_port()
        client = service.client("--redirect-uri", redirect_uri(port), "--scope", SCOPE, *client_args)
        apache = start_apache(tmp_path / f"apache-{len(started)}", service.url, client["client_id"],
                              client["client_secret"], port=port)
        started.append(apache)
        return client, apache

    yield start
    for apache in started:
        apache.stop()


@pytest.fixture
def new_browser(tmp_path):
    """A fresh headless Chromium (its own profile: no cookie of Apache's or bearerbridge's) per call."""
    started = []

    def start():
        profile = tmp_path / f"browser-{len(started)}"
        profile.mkdir()
        started.append(start_chromium(profile))
        return started[-1]

    yield start
    for driver in started:
        driver.quit()


@pytest.fixture
def own_service(tmp_path) -> Service:
    """A bearerbridge of the test's own, whose keys it may rotate (not the session's shared one)."""
    directory = tmp_path / "bearerbridge"
    directory.mkdir()
    running = Service.start(directory)
    yield running
    running.stop()


def restart(service: Service) -> Service:
    """Stop `service` and start it again on the same directory (database, secret), URL and port."""
    service.stop()
    port = urlsplit(service.url).port
    return Service.start(service.directory, url=service.url, listen=[f"tcp:{port}:interface=127.0.0.1"])


def jws_parts(token: str) -> tuple[dict, dict]:
    """The header and the claims of a compact JWS, unverified (Apache verified it)."""
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
                      for part in token.split(".")[:2])
    return header, claims


def published_kids(service: Service) -> set[str]:
    response = requests.get(f"{service.url}/jwks", timeout=10)
    assert response.status_code == 200, response.text
    return {key["kid"] for key in response.json()["keys"]}


def jwks_fetches(apache: Apache, service: Service) -> int:
    """How many times mod_auth_openidc fetched bearerbridge's JWKS (its debug log names every call)."""
    return apache.error_log_path.read_text().count(f"oidc_util_http_call: url={service.url}/jwks,")


def go_to_bearerbridge(browser, apache: Apache, service: Service) -> dict[str, str]:
    """Ask Apache for its protected page, which must land on bearerbridge's login form; the query
    of the authorization request mod_auth_openidc sent."""
    offset = log_size(apache.error_log_path)
    browser.get(apache.page_url)
    try:
        WebDriverWait(browser, WAIT).until(EC.element_to_be_clickable((By.ID, "sign-in")))
    except TimeoutException:
        raise AssertionError(f"no login form at {browser.current_url}: {page_text(browser)}\n"
                             f"{apache.logged_since(offset)}") from None
    assert browser.current_url.startswith(f"{service.url}/authorize?"), browser.current_url
    return query(browser.current_url)


def sign_in(browser, username: str, password: str) -> None:
    """Fill bearerbridge's login form and wait for its consent page."""
    browser.find_element(By.ID, "username").send_keys(username)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, WAIT).until(EC.element_to_be_clickable((By.ID, "approve")))
    assert username in page_text(browser)


def approve_and_land(browser, apache: Apache) -> dict[str, str]:
    """Approve, and wait to be back on Apache's protected page; what the page shows, by id."""
    offset = log_size(apache.error_log_path)
    browser.find_element(By.ID, "approve").click()
    try:
        WebDriverWait(browser, WAIT).until(
            lambda b: b.current_url == apache.page_url and b.find_elements(By.ID, "remote-user"))
    except TimeoutException:
        raise AssertionError(f"not on Apache's page but at {browser.current_url}: {page_text(browser)}\n"
                             f"{apache.logged_since(offset)}") from None
    return {name: browser.find_element(By.ID, name).text for name in SHOWN}


def page_text(browser) -> str:
    return browser.find_element(By.TAG_NAME, "body").text[:1000]


def sign_in_at_apache(browser, apache: Apache, service: Service, username: str,
                      password: str) -> tuple[dict[str, str], dict[str, str]]:
    """The whole flow: the authorization request Apache sent, and what its page shows after."""
    request = go_to_bearerbridge(browser, apache, service)
    sign_in(browser, username, password)
    return request, approve_and_land(browser, apache)


def assert_shows_user(shown: dict[str, str], request: dict[str, str], client: dict, service: Service,
                      username: str, email: str, alg: str) -> dict:
    """Apache's page shows the user, from an ID token that answers Apache's request; its header."""
    assert shown["remote-user"] == username  # OIDCRemoteUserClaim preferred_username
    assert shown["preferred-username"] == username
    assert shown["email"] == email
    assert shown["sub"] and shown["sub"] != username  # opaque
    assert json.loads(shown["userinfo"])["sub"] == shown["sub"]  # Apache checked it too (Core §5.3.4)
    header, claims = jws_parts(shown["id-token"])
    assert header["alg"] == alg
    assert header["kid"] in published_kids(service)
    assert claims["iss"] == service.url
    assert client["client_id"] in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
    assert claims["nonce"] == request["nonce"]
    assert claims["sub"] == shown["sub"]
    return header


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_apache_shows_the_user_signed_in_through_bearerbridge(alg, service, start_rp, new_browser):
    """With an ES256 client (bearerbridge's default) and an RS256 one: mod_auth_openidc's request
    carries PKCE S256 and a nonce, and Apache accepts the ID token signed with that algorithm."""
    client, apache = start_rp(service, *(["--id-token-alg", alg] if alg != "ES256" else []))
    email = f"{alg.lower()}-user@example.org"
    username, password = service.user(email=email)

    request, shown = sign_in_at_apache(new_browser(), apache, service, username, password)

    assert request["client_id"] == client["client_id"]
    assert request["redirect_uri"] == apache.redirect_uri
    assert request["response_type"] == "code"
    assert set(request["scope"].split()) == set(SCOPE.split())
    assert request["code_challenge_method"] == "S256" and request["code_challenge"]
    assert request["state"] and request["nonce"]
    assert_shows_user(shown, request, client, service, username, email, alg)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_apache_accepts_an_id_token_of_the_key_rotated_in_while_it_ran(alg, own_service, start_rp, new_browser):
    """bearerbridge publishes its next key before signing with it, so an RP that cached the JWKS
    before a rotation validates the new key's ID tokens without any refetch."""
    service = own_service
    client, apache = start_rp(service, *(["--id-token-alg", alg] if alg != "ES256" else []))
    first = service.user(email="before@example.org")
    request, shown = sign_in_at_apache(new_browser(), apache, service, *first)
    before = assert_shows_user(shown, request, client, service, first[0], "before@example.org", alg)
    published_before = published_kids(service)
    assert jwks_fetches(apache, service) == 1

    service.cli("keys", "rotate")
    # The restart makes the new key sign at once; a running service would take up to a minute.
    service = restart(service)
    try:
        second = service.user(email="after@example.org")
        # A new browser: no session at Apache nor at bearerbridge, so Apache asks for a new ID token.
        request, shown = sign_in_at_apache(new_browser(), apache, service, *second)
        after = assert_shows_user(shown, request, client, service, second[0], "after@example.org", alg)
    finally:
        service.stop()

    assert after["kid"] != before["kid"]
    assert after["kid"] in published_before  # it was the published next key
    assert apache.alive()  # the same Apache all along, never restarted ...
    assert jwks_fetches(apache, service) == 1  # ... whose JWKS, cached before the rotation, had the new key


def test_a_user_who_denies_consent_gets_apache_s_error_page_and_no_session(service, start_rp, new_browser):
    """bearerbridge sends access_denied (with state and RFC 9207's iss) back to Apache's redirect
    URI; Apache answers with an error page, not the protected one, and makes no session: the next
    visit goes back to bearerbridge, where approving this time lets the user in."""
    _, apache = start_rp(service)
    username, password = service.user(email="refuser@example.org")
    browser = new_browser()
    request = go_to_bearerbridge(browser, apache, service)
    sign_in(browser, username, password)

    browser.find_element(By.ID, "deny").click()
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(apache.redirect_uri + "?"))
    response = query(browser.current_url)
    assert response["error"] == "access_denied" and "code" not in response
    assert response["state"] == request["state"] and response["iss"] == service.url
    WebDriverWait(browser, WAIT).until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "Error"))
    assert not browser.find_elements(By.ID, "remote-user")
    assert username not in browser.page_source
    # mod_auth_openidc 2.4.12.3 takes any request to its redirect URI that carries `iss` and no
    # code for a third-party-initiated login (its "discovery response"), so its page does not name
    # access_denied but says that OIDCDefaultURL is not set; the answer is an error all the same.
    answers = [(user, status) for user, line, status in apache.requests_logged()
               if line.startswith(f"GET {REDIRECT_PATH}?")]
    assert len(answers) == 1 and answers[0][0] == "-" and answers[0][1] >= 400, answers

    browser.get(apache.page_url)  # still signed in at bearerbridge, which asks for consent again
    WebDriverWait(browser, WAIT).until(EC.element_to_be_clickable((By.ID, "approve")))
    assert approve_and_land(browser, apache)["remote-user"] == username

"""Regenerate the README's screenshots of the pages people see: docs/screenshots/*.png.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--keep]

Run from a checkout whose package and test extras are installed (`pip install ".[test]"`); it
needs Debian's chromium and chromedriver (scripts/install-peers), and uses optipng when it is
installed. It starts a real `twistd -n bearerbridge` from a temporary config (SQLite in a temporary
directory, HTTP on loopback, the issuer http://localhost:PORT because browsers refuse WebAuthn on
an IP address) and tells a story through headless Chromium, photographing each page as it goes:

- the operator (the `bearerbridge` CLI) adds alice (an admin) and two other users, and registers
  Thunderbird and K-9 Mail (public, desktop and phone), Roundcube (confidential webmail) and
  Dovecot (a resource server); the logos are drawn here and served from a loopback server, which
  also answers the desktop and phone apps' loopback redirect URIs (Roundcube's names a host that
  does not resolve: the code is read off the browser's address either way);
- alice signs in at /authorize and allows each app on the consent page (real code grants,
  exchanged at /token); bob grants two of them too, so that the admin pages count users;
- the apps' tokens are used as the mail servers would use them: Dovecot introspects them naming
  the service and the mail client's address (X-Dovecot-Auth-Service/-Remote), Postfix asks the
  Dovecot-protocol SASL socket (with `rip`), Roundcube reads /userinfo; alice makes two app
  passwords on /account/app-passwords and they are used at SMTP (PLAIN on the socket) and at
  WebDAV (forward-auth with HTTP Basic). Last uses are written behind every few seconds
  (uses.FLUSH_EVERY), so the script waits for /account to show them all;
- alice turns on two-factor sign-in (TOTP, the code computed with pyotp from the key on the page),
  adds a passkey (Selenium's virtual authenticator), signs out, and signs in again: password, then
  the second-factor prompt, answered with the passkey;
- as an admin she looks at /admin, a client, registers Nextcloud (its secret shown once) and
  looks at her own user page.

Addresses are from the documentation ranges (RFC 5737): the browser sends X-Forwarded-For, which
bearerbridge believes from 127.0.0.1 (`[http] trusted_proxies`), as it would from a reverse proxy;
its user agent is set to an ordinary desktop Chrome's rather than "HeadlessChrome".

Pages are 1280 px wide and as tall as their content; /account and the consent page also 390 px
wide, as on a phone (`<page>-phone.png`).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyotp
import requests
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import Protocol, Transport, VirtualAuthenticatorOptions
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test helpers: a real service, the browser, the Dovecot protocol's client

from tests.support import Service, authorize_url, exchange_code, form_fields, free_port, get_code, pkce_pair  # noqa: E402
from tests.test_browser import WAIT, start_chromium  # noqa: E402
from tests.test_sasl_service import DovecotClient, xoauth2  # noqa: E402

DESKTOP, PHONE = 1280, 390  # px, CSS pixels at a device scale of 1
USER, PASSWORD = "alice", "correct horse battery staple"
OTHERS = (("bob", "Bob Okafor"), ("carol", "Carol Nguyen"))
HOME = "203.0.113.45"  # alice's home: her browser, Thunderbird, the printer
PHONE_NET = "198.51.100.77"  # her phone on a mobile network: K-9 Mail, DAVx⁵, Safari
WEBMAIL = "192.0.2.10"  # the Roundcube server
WEBMAIL_REDIRECT = "https://webmail.example.org/index.php/login/oauth"  # resolved by no one: see grant()
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
              "Safari/537.36")
PHONE_AGENT = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
               "Version/17.5 Mobile/15E148 Safari/604.1")
LIMIT = 400_000  # bytes: a screenshot larger than this is reported

# Simple stand-ins for the apps' logos (letters on a colour), not their trademarks.
LOGOS = {
    "thunderbird": ("#0a84ff", "T"),
    "k9": ("#e8590c", "K9"),
    "roundcube": ("#37beff", "R"),
}


def logo_svg(colour: str, letters: str) -> bytes:
    size = 22 if len(letters) < 2 else 18
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 48 48"><rect width="48" height="48" rx="10" '
            f'fill="{colour}"/><text x="24" y="32" font-family="sans-serif" font-size="{size}" font-weight="bold" '
            f'fill="#fff" text-anchor="middle">{letters}</text></svg>').encode()


class AppSide:
    """A loopback HTTP server for the apps: their logos (/logos/NAME.svg), and the desktop and phone
    apps' loopback redirect URIs (RFC 8252 §7.3: registered without a port, used with this one)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = urlsplit(self.path).path.removeprefix("/logos/").removesuffix(".svg")
                if name in LOGOS:
                    self._send(logo_svg(*LOGOS[name]), "image/svg+xml")
                else:  # a native app's listener, taking the code
                    self._send(b"<!doctype html><title>Connected</title><p>Connected.</p>", "text/html")

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="app-side", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Camera:
    """Photographs the browser's page at a width and the height of its content into `out`."""

    def __init__(self, browser: Chrome, out: Path, every_width: bool = False) -> None:
        self.browser = browser
        self.out = out
        self.every_width = every_width
        self.taken: list[Path] = []

    def __call__(self, name: str, *widths: int) -> None:
        for width in (DESKTOP, PHONE) if self.every_width else widths or (DESKTOP,):
            path = self.out / (f"{name}-phone.png" if width == PHONE else f"{name}.png")
            self._shoot(width, path)
            if shutil.which("optipng"):
                subprocess.run(["optipng", "-quiet", "-o2", "-strip", "all", str(path)], check=True)
            self.taken.append(path)
            print(f"{path}: {path.stat().st_size // 1024} KB", flush=True)

    def _shoot(self, width: int, path: Path) -> None:
        """The viewport set through the DevTools protocol (a window's size would include the
        browser's frame), then made as tall as the page's content: `main` and its margin."""
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width == PHONE}
        try:
            height = 0
            for _ in range(3):  # a new height may reflow the page (a scroll bar comes or goes)
                self.browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
                measured = self.browser.execute_script(
                    "const m = document.querySelector('main'); const r = m.getBoundingClientRect();"
                    "return Math.ceil(r.bottom + window.scrollY + parseFloat(getComputedStyle(m).marginBottom));")
                if measured == height:
                    break
                height = measured
                metrics["height"] = max(200, height)
            self.browser.execute_script("window.scrollTo(0, 0)")
            assert self.browser.save_screenshot(str(path)), path
        finally:
            self.browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# -- the service and what the operator sets up ----------------------------------------------------

def start_service(directory: Path) -> tuple[Service, int]:
    """A bearerbridge at http://localhost:PORT with a Dovecot-protocol socket (PLAIN at smtp and
    imap, for app passwords) and forward-auth taking HTTP Basic (WebDAV); its SASL port."""
    port, sasl_port = free_port(), free_port()
    service = Service.start(directory, url=f"http://localhost:{port}", listen=[f"tcp:{port}:interface=127.0.0.1"],
                            extra=f"""
[sasl]
listen = ["tcp:{sasl_port}:interface=127.0.0.1"]
plain = ["smtp", "imap"]
[[forward_auth.rules]]
host = ""
path_prefix = "/"
read_scope = "webdav:read"
write_scope = "webdav:write"
basic = true
""")
    return service, sasl_port


def set_up(service: Service, apps: AppSide) -> dict[str, dict]:
    """Users and clients, as an operator makes them with the CLI; the clients by their short names."""
    service.cli("user", "add", USER, "--admin", "--display-name", "Alice Martin", "--email", "alice@example.org",
                "--password-stdin", stdin=PASSWORD + "\n")
    for name, display in OTHERS:
        service.cli("user", "add", name, "--display-name", display, "--email", f"{name}@example.org",
                    "--password-stdin", stdin=PASSWORD + "\n")
    service.cli("user", "disable", "carol")

    def client(*args: str) -> dict:
        return json.loads(service.cli("client", "create", "--json", *args))
    return {
        "thunderbird": client("--name", "Thunderbird", "--public", "--redirect-uri", "http://127.0.0.1/",
                              "--scope", "openid email imap smtp", "--website", "https://www.thunderbird.net/",
                              "--logo-uri", f"{apps.base}/logos/thunderbird.svg"),
        "k9": client("--name", "K-9 Mail", "--public", "--redirect-uri", "http://127.0.0.1/oauth2redirect",
                     "--scope", "imap smtp",
                     "--website", "https://k9mail.app/", "--logo-uri", f"{apps.base}/logos/k9.svg"),
        "roundcube": client("--name", "Roundcube Webmail", "--redirect-uri", WEBMAIL_REDIRECT,
                            "--scope", "openid profile email imap smtp", "--website", "https://roundcube.net/",
                            "--logo-uri", f"{apps.base}/logos/roundcube.svg"),
        "dovecot": client("--name", "Dovecot (mail.example.org)", "--resource-server", "--grant",
                          "client_credentials", "--scope", "imap"),
    }


# -- the browser ------------------------------------------------------------------------------------

def element(browser: Chrome, element_id: str, clickable: bool = False) -> WebElement:
    condition = EC.element_to_be_clickable if clickable else EC.visibility_of_element_located
    found: WebElement = WebDriverWait(browser, WAIT).until(condition((By.ID, element_id)))
    return found


def sign_in_form(browser: Chrome) -> None:
    element(browser, "username").send_keys(USER)
    element(browser, "password").send_keys(PASSWORD)
    element(browser, "sign-in", clickable=True).click()


def redirect_uri(apps: AppSide, client: dict) -> str:
    """The client's redirect URI as the app uses it: a loopback one with the port of `apps`."""
    registered: str = client["redirect_uris"][0]
    return registered.replace("http://127.0.0.1/", f"{apps.base}/")


def grant(browser: Chrome, service: Service, apps: AppSide, client: dict, scope: str,
          photograph: Callable[[], None] = lambda: None) -> dict:
    """A code grant for alice through the consent page (`photograph` called there); the tokens.
    The code is read off the address the browser was sent to (for Roundcube a host that does
    not resolve: the browser's error page keeps the address)."""
    verifier, challenge = pkce_pair()
    uri = redirect_uri(apps, client)
    browser.get(authorize_url(service.url, client["client_id"], uri, challenge, scope))
    element(browser, "approve", clickable=True)
    photograph()
    element(browser, "approve", clickable=True).click()
    WebDriverWait(browser, WAIT).until(lambda b: b.current_url.startswith(uri + "?"))
    code = parse_qs(urlsplit(browser.current_url).query)["code"][0]
    answer = exchange_code(service, client, code, verifier, redirect_uri=uri)
    assert answer.status_code == 200, answer.text
    tokens: dict = answer.json()
    return tokens


def make_app_password(browser: Chrome, name: str, services: tuple[str, ...], expiry: str) -> str:
    """Fill in /account/app-passwords' form; the secret on the page that shows it once."""
    element(browser, "app-password-name").send_keys(name)
    for box in browser.find_elements(By.CSS_SELECTOR, "input[id^=service-]"):
        if box.is_selected() != (box.get_attribute("id") in {f"service-{s}" for s in services}):
            box.click()
    Select(element(browser, "expiry")).select_by_value(expiry)
    element(browser, "create-app-password", clickable=True).click()
    return element(browser, "secret").text


def code_now(secret: str, offset: int) -> str:
    """The TOTP code `offset` steps from now, away from a step's end."""
    while time.time() % 30 > 25:
        time.sleep(0.2)
    return pyotp.TOTP(secret).at(time.time() + 30 * offset)


# -- the apps and servers using what they were given ------------------------------------------------

def introspect_as_dovecot(service: Service, dovecot: dict, token: str, at: str, remote: str) -> None:
    """Dovecot checking an app's login to `at`, naming the mail client's address (send_auth_headers)."""
    answer = requests.post(f"{service.url}/introspect", data={"token": token},
                           auth=(dovecot["client_id"], dovecot["client_secret"]), timeout=WAIT,
                           headers={"X-Dovecot-Auth-Service": at, "X-Dovecot-Auth-Remote": f"{remote}:51514"})
    assert answer.status_code == 200 and answer.json()["active"], answer.text


def sasl_login(sasl_port: int, mechanism: str, message: bytes, at: str, remote: str) -> None:
    """Postfix asking the Dovecot-protocol socket about a client's AUTH from `remote`."""
    socket_client = DovecotClient(("127.0.0.1", sasl_port))
    try:
        resp = base64.b64encode(message).decode()
        socket_client.send(f"AUTH\t1\t{mechanism}\tservice={at}\tnologin\tlip=192.0.2.25\trip={remote}"
                           f"\tresp={resp}\n".encode())
        answer = socket_client.line()
        assert answer.startswith("OK\t1"), answer
    finally:
        socket_client.close()


def use_everything(service: Service, sasl_port: int, clients: dict[str, dict], tokens: dict[str, dict],
                   app_passwords: dict[str, str]) -> None:
    dovecot = clients["dovecot"]
    bird, k9, webmail = (tokens[k]["access_token"] for k in ("thunderbird", "k9", "roundcube"))
    introspect_as_dovecot(service, dovecot, bird, "imap", HOME)
    sasl_login(sasl_port, "XOAUTH2", base64.b64decode(xoauth2(USER, bird)), "smtp", HOME)
    introspect_as_dovecot(service, dovecot, k9, "imap", PHONE_NET)
    introspect_as_dovecot(service, dovecot, webmail, "imap", WEBMAIL)
    sasl_login(sasl_port, "XOAUTH2", base64.b64decode(xoauth2(USER, webmail)), "smtp", WEBMAIL)
    userinfo = requests.get(f"{service.url}/userinfo", timeout=WAIT,
                            headers={"Authorization": f"Bearer {webmail}", "X-Forwarded-For": WEBMAIL})
    assert userinfo.status_code == 200, userinfo.text
    sasl_login(sasl_port, "PLAIN", f"\0{USER}\0{app_passwords['printer']}".encode(), "smtp", HOME)
    webdav = requests.get(f"{service.url}/forward-auth", timeout=WAIT, auth=(USER, app_passwords["davx5"]),
                          headers={"X-Forwarded-Method": "PROPFIND", "X-Forwarded-Uri": "/dav/calendars/alice/",
                                   "X-Forwarded-Host": "dav.example.org", "X-Forwarded-For": PHONE_NET})
    assert webdav.status_code == 200, (webdav.status_code, webdav.text)


def sign_in_elsewhere(service: Service) -> None:
    """alice signed in at /account on her phone too (Safari): a second session on the page."""
    with requests.Session() as phone:
        phone.headers.update({"User-Agent": PHONE_AGENT, "X-Forwarded-For": PHONE_NET})
        action, fields = form_fields(phone.get(f"{service.url}/account", timeout=WAIT).text)
        page = phone.post(service.url + action, data={**fields, "username": USER, "password": PASSWORD},
                          timeout=WAIT)
        assert page.ok and "account-user" in page.text, page.text[:500]


def wait_for_uses(browser: Chrome, service: Service, expected: int) -> None:
    """Until /account shows `expected` last uses: they are written behind (uses.FLUSH_EVERY)."""
    deadline = time.monotonic() + 30
    while True:
        browser.get(f"{service.url}/account")
        shown = len(browser.find_elements(By.CSS_SELECTOR, "ul.uses li"))
        if shown >= expected:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"/account shows {shown} of {expected} last uses")
        time.sleep(1)


# -- the story --------------------------------------------------------------------------------------

def story(service: Service, sasl_port: int, apps: AppSide, browser: Chrome, shoot: Camera) -> None:
    clients = set_up(service, apps)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"X-Forwarded-For": HOME}})
    browser.add_virtual_authenticator(VirtualAuthenticatorOptions(
        protocol=Protocol.CTAP2, transport=Transport.INTERNAL, has_resident_key=True, has_user_verification=True,
        is_user_verified=True, is_user_consenting=True))

    # Thunderbird asks; alice signs in and allows it: the sign-in and consent pages.
    tokens: dict[str, dict] = {}
    verifier, challenge = pkce_pair()
    bird = clients["thunderbird"]
    browser.get(authorize_url(service.url, bird["client_id"], redirect_uri(apps, bird), challenge,
                              "openid email imap smtp"))
    element(browser, "passkey-sign-in")  # shown once the script found WebAuthn
    shoot("sign-in")
    sign_in_form(browser)
    element(browser, "approve")  # signed in: else grant() below could race the sign-in's redirect
    tokens["thunderbird"] = grant(browser, service, apps, bird, "openid email imap smtp",
                                  lambda: shoot("consent", DESKTOP, PHONE))
    tokens["k9"] = grant(browser, service, apps, clients["k9"], "imap smtp")
    tokens["roundcube"] = grant(browser, service, apps, clients["roundcube"], "openid profile email imap smtp")
    for name in ("thunderbird", "roundcube"):  # bob uses them too: the admin pages count him
        get_code(service, clients[name], "bob", PASSWORD, redirect_uri=redirect_uri(apps, clients[name]))

    # Two app passwords; the second one's page, shown once.
    browser.get(f"{service.url}/account/app-passwords")
    secrets = {"printer": make_app_password(browser, "Office printer (scan to e-mail)", ("smtp",), "365")}
    element(browser, "saved", clickable=True).click()
    secrets["davx5"] = make_app_password(browser, "DAVx⁵ on my phone", ("webdav",), "never")
    shoot("app-passwords-new")
    element(browser, "saved", clickable=True).click()

    sign_in_elsewhere(service)
    use_everything(service, sasl_port, clients, tokens, secrets)

    # Two-factor sign-in: the key and its QR code, the recovery codes, the page once it is on.
    browser.get(f"{service.url}/account/two-factor")
    element(browser, "begin", clickable=True).click()
    key = element(browser, "secret").text.replace(" ", "")
    shoot("two-factor-setup")
    element(browser, "code").send_keys(code_now(key, -1))  # leaves the current step's code unused
    element(browser, "confirm", clickable=True).click()
    element(browser, "recovery-codes")
    shoot("two-factor-recovery-codes")
    element(browser, "saved", clickable=True).click()
    element(browser, "recovery-left")
    shoot("two-factor")

    # A passkey, then signing out and in again: the second-factor prompt, answered with it.
    browser.get(f"{service.url}/account/passkeys")
    element(browser, "passkey-name").send_keys("Laptop (fingerprint reader)")
    element(browser, "add-passkey", clickable=True).click()
    element(browser, "notice")
    browser.get(f"{service.url}/logout")
    element(browser, "sign-out", clickable=True).click()
    element(browser, "signed-out")
    browser.get(f"{service.url}/account")
    sign_in_form(browser)
    element(browser, "use-passkey", clickable=True)
    shoot("second-factor")
    element(browser, "use-passkey", clickable=True).click()
    element(browser, "account-user")
    browser.get(f"{service.url}/account/passkeys")
    element(browser, "passkey-list")
    shoot("passkeys")

    # The user's own pages, once the uses are written: imap and smtp of Thunderbird, imap of K-9 Mail,
    # imap, smtp and userinfo of Roundcube; smtp of the printer's app password, webdav of DAVx⁵'s.
    wait_for_uses(browser, service, expected=(2 + 1 + 3) + (1 + 1))
    shoot("account", DESKTOP, PHONE)
    browser.get(f"{service.url}/account/app-passwords")
    element(browser, "app-passwords")
    shoot("app-passwords")

    # /admin: the lists, a client, registering one (its secret shown once), a user.
    browser.get(f"{service.url}/admin")
    element(browser, "clients")
    shoot("admin")
    browser.get(f"{service.url}/admin/clients/{clients['roundcube']['client_id']}")
    element(browser, "granted")
    shoot("admin-client")
    browser.get(f"{service.url}/admin/clients/new")
    element(browser, "name").send_keys("Nextcloud")
    element(browser, "redirect-uris").send_keys("https://cloud.example.org/apps/user_oidc/code")
    for scope in ("imap", "smtp", "xmpp"):
        box = element(browser, f"scope-{scope}")
        if box.is_selected():
            box.click()
    shoot("admin-client-new")
    element(browser, "register", clickable=True).click()
    element(browser, "client-secret")
    shoot("admin-client-secret")
    browser.get(f"{service.url}/admin")
    browser.find_element(By.LINK_TEXT, USER).click()
    element(browser, "grants")
    shoot("admin-user")


@contextmanager
def running(directory: Path) -> Iterator[tuple[Service, int, AppSide, Chrome]]:
    apps = AppSide()
    service = browser = None
    try:
        service, sasl_port = start_service(directory / "service")
        browser = start_chromium(directory, f"--user-agent={USER_AGENT}",
                                 f"--host-resolver-rules=MAP {urlsplit(WEBMAIL_REDIRECT).hostname} ~NOTFOUND")
        yield service, sasl_port, apps, browser
    finally:
        if browser is not None:
            browser.quit()
        if service is not None:
            service.stop()
        apps.close()


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    options.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where the PNGs go")
    options.add_argument("--keep", action="store_true", help="keep the temporary directory (config, logs)")
    options.add_argument("--every-width", action="store_true", help="every page at the phone's width too")
    args = options.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bearerbridge-shots-"))
    (directory / "service").mkdir()
    try:
        with running(directory) as (service, sasl_port, apps, browser):
            shoot = Camera(browser, args.out.resolve(), args.every_width)
            try:
                story(service, sasl_port, apps, browser, shoot)
            except BaseException:
                print(f"failed at {browser.current_url}; the service's log: {service.directory / 'twistd.log'}",
                      file=sys.stderr)
                args.keep = True
                raise
    finally:
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    large = [p.name for p in shoot.taken if p.stat().st_size > LIMIT]
    if large:
        print(f"larger than {LIMIT // 1000} KB: {', '.join(large)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""App passwords against the real peers (issue 12): made on /account by a browser-like `requests`
session, one logs in to a real Postfix with PLAIN (smtplib's login; Postfix asks bearerbridge
over the Dovecot protocol) and another to WebDAV through a real nginx with HTTP Basic (curl -u;
nginx asks /forward-auth); each is refused on the service it was not made for, and stops working
when revoked on the page or once expired.

Needs Debian's postfix, nginx with libnginx-mod-http-dav-ext, curl (scripts/install-peers) and
root; skips without them locally and fails under CI=true.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from .peer_setup import StartedPeers, logs_printed, require_peers_as_root
from .peers import Postfix, start_postfix, wait_for_sasl
from .peers_web import DAV_EXT_MODULE, NGINX, Nginx, start_nginx
from .support import Service, form_fields, free_port, require_peer

pytestmark = pytest.mark.peer

WAIT = 10  # seconds: the bound on every exchange
CACHE_TTL = 1  # [sasl] cache_ttl: how long another process's change may take to be seen


@dataclass
class Stack:
    service: Service
    postfix: Postfix
    nginx: Nginx
    user: str
    password: str

    def logs(self) -> dict[str, Path]:
        return {"bearerbridge": self.service.directory / "twistd.log", "postfix": self.postfix.log_path,
                "nginx error log": self.nginx.error_log_path}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    require_peer("nginx", NGINX)
    require_peers_as_root("/usr/sbin/postfix", str(DAV_EXT_MODULE), "curl")
    top = tmp_path_factory.mktemp("app-passwords")
    for name in ("bearerbridge", "postfix", "nginx"):
        (top / name).mkdir()
    sasl_port = free_port()
    with StartedPeers() as started:
        service = started(Service.start(top / "bearerbridge", extra=f"""
[sasl]
listen = ["tcp:{sasl_port}:interface=127.0.0.1"]
plain = ["smtp"]
cache_ttl = {CACHE_TTL}
[[forward_auth.rules]]
basic = true
"""))
        wait_for_sasl(service, sasl_port)
        postfix = started(start_postfix(top / "postfix", f"inet:127.0.0.1:{sasl_port}"))
        nginx = started(start_nginx(top / "nginx", service.url))
        user, password = service.user()
        yield Stack(service, postfix, nginx, user, password)


@pytest.fixture(autouse=True)
def peer_logs(stack):
    """Print what each program logged during the test; pytest shows it only when the test fails."""
    with logs_printed(stack.logs()):
        yield


# -- the user's page, as a browser drives it --------------------------------------------------

def signed_in(stack: Stack) -> requests.Session:
    browser = requests.Session()
    page = browser.get(stack.service.url + "/account", timeout=WAIT)
    _, fields = form_fields(page.text)
    answer = browser.post(stack.service.url + "/account", timeout=WAIT, allow_redirects=False,
                          data={**fields, "username": stack.user, "password": stack.password})
    assert answer.status_code == 303, answer.text
    return browser


def make(stack: Stack, browser: requests.Session, name: str, services: tuple[str, ...], expiry: str = "30"
         ) -> tuple[int, str]:
    """An app password made on /account/app-passwords: (its id, the secret shown once)."""
    url = stack.service.url + "/account/app-passwords"
    page = browser.get(url, timeout=WAIT)
    assert all(f'id="service-{s}"' in page.text for s in ("smtp", "webdav")), page.text
    _, fields = form_fields(page.text)
    answer = browser.post(url, timeout=WAIT, data={
        "csrf": fields["csrf"], "step": "create", "name": name, "expiry": expiry,
        **{f"service:{s}": "on" for s in services}})
    assert answer.status_code == 200, answer.text
    secret = re.search(r'<code class="secret" id="secret">([^<]+)</code>', answer.text)
    found = re.search(r'id="app-password-(\d+)"', answer.text)
    assert secret and found, answer.text
    return int(found[1]), secret[1]


def revoke(stack: Stack, browser: requests.Session, app_id: int) -> None:
    page = browser.get(stack.service.url + "/account", timeout=WAIT)
    assert f'id="revoke-app-password-{app_id}"' in page.text
    _, fields = form_fields(page.text)
    answer = browser.post(stack.service.url + "/account/app-passwords", timeout=WAIT,
                          data={"csrf": fields["csrf"], "step": "revoke", "id": str(app_id)})
    assert answer.status_code == 200 and "revoked" in answer.text, answer.text


# -- the clients ------------------------------------------------------------------------------

def smtp_login(stack: Stack, user: str, password: str) -> int:
    """smtplib's own login (it picks PLAIN among what Postfix offers): the SMTP reply code."""
    with smtplib.SMTP("127.0.0.1", stack.postfix.port, local_hostname="client.example", timeout=WAIT) as smtp:
        smtp.ehlo()
        assert "PLAIN" in smtp.esmtp_features["auth"].split()
        try:
            return smtp.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code


def curl(stack: Stack, user: str, password: str, *args: str) -> int:
    """curl with HTTP Basic through nginx: the HTTP status."""
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(WAIT),
                           "-u", f"{user}:{password}", *args], capture_output=True, text=True, timeout=WAIT + 5)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def dav_put_and_get(stack: Stack, user: str, password: str, name: str) -> tuple[int, int]:
    body = stack.nginx.share.parent / f"{name}.txt"
    body.write_text(f"hello from {name}\n")
    put = curl(stack, user, password, "-T", str(body), f"{stack.nginx.url}/{name}.txt")
    get = curl(stack, user, password, f"{stack.nginx.url}/{name}.txt")
    return put, get


def test_an_app_password_logs_in_to_postfix_with_plain_and_not_to_webdav(stack):
    browser = signed_in(stack)
    app_id, secret = make(stack, browser, "Relay", ("smtp",))
    assert smtp_login(stack, stack.user, secret) == 235
    assert smtp_login(stack, stack.user, secret[:-2] + "xx") == 535
    assert smtp_login(stack, "someone-else", secret) == 535  # the user part must name its user
    assert curl(stack, stack.user, secret, f"{stack.nginx.url}/") == 401  # not made for webdav
    revoke(stack, browser, app_id)
    assert smtp_login(stack, stack.user, secret) == 535


def test_an_app_password_opens_webdav_through_nginx_with_basic_and_not_smtp(stack):
    browser = signed_in(stack)
    app_id, secret = make(stack, browser, "Files", ("webdav",), expiry="never")
    assert dav_put_and_get(stack, stack.user, secret, "basic") == (201, 200)
    assert (stack.nginx.share / "basic.txt").read_text() == "hello from basic\n"
    assert curl(stack, stack.user, "not-it", f"{stack.nginx.url}/basic.txt") == 401
    assert smtp_login(stack, stack.user, secret) == 535  # not made for smtp
    revoke(stack, browser, app_id)
    assert curl(stack, stack.user, secret, f"{stack.nginx.url}/basic.txt") == 401


def test_an_expired_app_password_stops_working(stack):
    browser = signed_in(stack)
    app_id, secret = make(stack, browser, "Both", ("smtp", "webdav"))
    assert smtp_login(stack, stack.user, secret) == 235
    assert dav_put_and_get(stack, stack.user, secret, "both") == (201, 200)
    with sqlite3.connect(stack.service.directory / "bearerbridge.db") as db:  # its expiry, moved to the past
        db.execute("UPDATE app_passwords SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, app_id))
    time.sleep(CACHE_TTL + 0.3)  # what the service read of it is forgotten within cache_ttl
    assert smtp_login(stack, stack.user, secret) == 535
    assert curl(stack, stack.user, secret, f"{stack.nginx.url}/both.txt") == 401

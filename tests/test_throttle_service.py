"""Throttled guessing through a real `twistd bearerbridge`: the login form from one address while
another user signs in from another, X-Forwarded-For from a trusted proxy only, /token's 429,
and the Dovecot socket's delayed and refused failures per `rip`. bench/guesses.py measures the rates."""

from __future__ import annotations

import base64
import time

import pytest
import requests
from requests.adapters import HTTPAdapter

from .support import Service, authorize_url, form_fields, free_port, pkce_pair
from .test_sasl_service import DovecotClient

CB = "https://app.example/cb"
SEP = "\x01"
THROTTLE = """
[throttle.sign_in]
first_delay = 0.2
max_delay = 0.4
account_block_after = 6
address_block_after = 8
block = 120
[throttle.clients]
free_failures = 1
first_delay = 0.2
max_delay = 0.4
address_block_after = 3
[throttle.sasl]
first_delay = 0.5
max_delay = 0.5
address_block_after = 3
[sasl]
listen = ["tcp:{port}:interface=127.0.0.1"]
"""


class FromAddress(HTTPAdapter):
    """Connections from a given loopback address (all of 127.0.0.0/8 is on lo)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def browser_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", FromAddress(address))
    return session


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("throttle")
    port = free_port()
    running = Service.start(directory, extra=THROTTLE.format(port=port), throttled=True)
    running.sasl_port = port
    yield running
    running.stop()


def sign_in(service: Service, browser: requests.Session, client: dict, username: str, password: str,
            headers: dict | None = None) -> requests.Response:
    _, challenge = pkce_pair()
    page = browser.get(authorize_url(service.url, client["client_id"], CB, challenge, "imap"), headers=headers)
    action, fields = form_fields(page.text)
    return browser.post(service.url + action, data={**fields, "username": username, "password": password},
                        headers=headers, allow_redirects=False, timeout=30)


def test_guessing_at_the_login_form_is_blocked_while_another_address_signs_in_at_once(service):
    client = service.client("--redirect-uri", CB, "--scope", "imap")
    victim, _ = service.user()
    other, password = service.user()
    attacker = browser_from("127.0.0.2")
    codes = [sign_in(service, attacker, client, victim, f"guess{i}").status_code for i in range(7)]
    assert codes == [401] * 6 + [429]  # the account blocked at its sixth failure; a refusal is no failure
    codes = [sign_in(service, attacker, client, service.unique("nobody"), "guess").status_code for _ in range(2)]
    assert codes == [401, 401]
    blocked = sign_in(service, attacker, client, other, password)
    assert blocked.status_code == 429  # the address blocked at its eighth failure: for every user
    assert "try again in 2 minutes" in blocked.text and blocked.headers["Retry-After"]
    started = time.monotonic()
    answer = sign_in(service, browser_from("127.0.0.3"), client, other, password)
    assert answer.status_code == 200 and 'name="decision"' in answer.text  # signed in, asked to consent
    assert time.monotonic() - started < 2  # not held up by the other address's failures


def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(service):
    client = service.client("--redirect-uri", CB, "--scope", "imap")
    proxy = browser_from("127.0.0.1")  # trusted by default: a reverse proxy on this host
    for _ in range(8):
        sign_in(service, proxy, client, service.unique("nobody"), "guess", headers={"X-Forwarded-For": "192.0.2.9"})
    refused = sign_in(service, proxy, client, service.unique("nobody"), "guess",
                      headers={"X-Forwarded-For": "10.0.0.1, 192.0.2.9"})
    assert refused.status_code == 429  # the last address is the one the proxy saw: 192.0.2.9, blocked
    other, password = service.user()
    answer = sign_in(service, proxy, client, other, password, headers={"X-Forwarded-For": "192.0.2.10"})
    assert answer.status_code == 200  # another client behind the same proxy is not
    forged = sign_in(service, browser_from("127.0.0.4"), client, other, password,
                     headers={"X-Forwarded-For": "192.0.2.9"})
    assert forged.status_code == 200  # from an untrusted address the header is ignored


def test_wrong_client_secrets_get_a_429_with_retry_after(service):
    app = service.client("--grant", "client_credentials", "--scope", "imap")
    program = browser_from("127.0.0.5")
    codes = [program.post(f"{service.url}/token", data={"grant_type": "client_credentials"},
                          auth=(app["client_id"], "wrong"), timeout=30).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    refused = program.post(f"{service.url}/token", data={"grant_type": "client_credentials"},
                           auth=(app["client_id"], app["client_secret"]), timeout=30)
    assert refused.status_code == 429 and refused.json()["error"] == "temporarily_unavailable"
    assert int(refused.headers["Retry-After"]) > 0
    elsewhere = requests.post(f"{service.url}/token", data={"grant_type": "client_credentials"},
                              auth=(app["client_id"], app["client_secret"]), timeout=30)
    assert elsewhere.status_code == 200


def plain(user: str, token: str) -> str:
    return base64.b64encode(f"\x00{user}\x00{token}".encode()).decode()


def test_the_dovecot_socket_answers_failures_late_and_refuses_a_failing_rip(service):
    user, _ = service.user()
    app = service.client("--redirect-uri", CB, "--scope", "imap")
    token = service.issue(user, app["client_id"], "imap")
    mail = DovecotClient(("127.0.0.1", service.sasl_port))
    other = DovecotClient(("127.0.0.1", service.sasl_port))
    started = time.monotonic()
    for i in range(3):
        mail.send(f"AUTH\t{i}\tOAUTHBEARER\tservice=imap\trip=192.0.2.66\tresp="
                  f"{base64.b64encode(f'n,a={user},{SEP}auth=Bearer nope{i}{SEP}{SEP}'.encode()).decode()}\n"
                  .encode())
    assert other.auth("1", "OAUTHBEARER", "imap", base64.b64encode(
        f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode(), "\trip=192.0.2.7") == f"OK\t1\tuser={user}"
    assert time.monotonic() - started < 0.5  # the good login did not wait for the failures
    mail.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        mail.sock.recv(1)  # and the failures, sent first, are still held
    mail.sock.settimeout(5)
    answers = [mail.line() for _ in range(3)]
    assert all(a.startswith("CONT") for a in answers)  # the RFC 7628 error round, after the delay
    assert time.monotonic() - started >= 0.5
    for i in range(3):
        mail.send(f"CONT\t{i}\tAQ==\n".encode())
    assert [mail.line().split("\t")[0] for _ in range(3)] == ["FAIL"] * 3
    refused = mail.auth("9", "OAUTHBEARER", "imap", base64.b64encode(
        f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode(), "\trip=192.0.2.66")
    assert refused == "FAIL\t9\treason=too many failed logins from this address; try again later\ttemp"
    mail.close()
    other.close()

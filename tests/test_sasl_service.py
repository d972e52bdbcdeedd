"""The SASL authority of a running bearerbridge: the Dovecot auth socket and POST /sasl.

The Dovecot client here sends, byte for byte, what Postfix, Exim and Prosody send
(their handshakes and AUTH parameters, below); the live peers are driven in test_peers_mail.py.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import requests

from .support import Service, free_port, introspect

SASL_CONFIG = """
[sasl]
listen = ["tcp:{port}:interface=127.0.0.1", "unix:{socket}:mode=600"]
plain = ["imap"]
cache_ttl = 1
[sasl.usernames]
xmpp = "localpart"
"""


@pytest.fixture(scope="module")
def sasl_service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sasl")
    port = free_port()
    running = Service.start(directory, extra=SASL_CONFIG.format(port=port, socket=directory / "auth"))
    running.sasl_port = port
    running.sasl_socket = directory / "auth"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def alice(sasl_service):
    """A user, an app client, and tokens for each scope combination the tests need."""
    service = sasl_service
    name = service.unique("alice")
    service.cli("user", "add", name, "--email", f"{name}@example.org", "--password-stdin", stdin="pw\n")
    client = service.client("--redirect-uri", "https://app.example/cb")

    def token(scope: str, ttl: str = "600") -> str:
        return service.issue(name, client["client_id"], scope, "--ttl", ttl)
    return name, token


def oauthbearer(user: str | None, token: str) -> str:
    gs2 = f"n,a={user}," if user else "n,,"
    return base64.b64encode(f"{gs2}\x01host=mail.example\x01port=587\x01auth=Bearer {token}\x01\x01".encode()).decode()


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


class DovecotClient:
    """A blocking client of the Dovecot auth protocol, as a mail server speaks it."""

    def __init__(self, address, family=socket.AF_INET, handshake: bytes = b"VERSION\t1\t0\nCPID\t4242\n"):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(address)
        self.buffer = b""
        self.greeting = []
        while (line := self.line()) != "DONE":
            self.greeting.append(line)
        self.send(handshake)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def auth(self, request_id: str, mechanism: str, service: str, resp: str | None, extra: str = "") -> str:
        params = f"service={service}\tnologin\tlip=127.0.0.1\trip=127.0.0.1{extra}"
        if resp is not None:
            params += f"\tresp={resp}"
        self.send(f"AUTH\t{request_id}\t{mechanism}\t{params}\n".encode())
        return self.line()

    def close(self):
        self.sock.close()


@pytest.fixture
def dovecot(sasl_service):
    client = DovecotClient(("127.0.0.1", sasl_service.sasl_port))
    yield client
    client.close()


def test_handshake_offers_the_configured_mechanisms(dovecot):
    assert dovecot.greeting[0] == "VERSION\t1\t2"
    mechs = [line.split("\t")[1] for line in dovecot.greeting if line.startswith("MECH\t")]
    assert mechs == ["OAUTHBEARER", "XOAUTH2", "PLAIN"]
    assert [line.split("\t")[0] for line in dovecot.greeting[-3:]] == ["SPID", "CUID", "COOKIE"]


def test_oauthbearer_and_xoauth2_logins(dovecot, alice):
    name, token = alice
    smtp = token("smtp")
    assert dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, smtp)) == f"OK\t1\tuser={name}"
    assert dovecot.auth("2", "OAUTHBEARER", "smtp", oauthbearer(None, smtp)) == f"OK\t2\tuser={name}"
    assert dovecot.auth("3", "XOAUTH2", "smtp", xoauth2(f"{name}@example.org", smtp)) == f"OK\t3\tuser={name}"


def test_a_token_is_good_only_for_its_services(dovecot, alice, sasl_service):
    name, token = alice
    imap_only = token("imap")
    line = dovecot.auth("7", "OAUTHBEARER", "smtp", oauthbearer(name, imap_only))
    verb, request_id, challenge = line.split("\t")
    assert (verb, request_id) == ("CONT", "7")
    assert json.loads(base64.b64decode(challenge)) == {
        "status": "insufficient_scope", "scope": "smtp",
        "openid-configuration": f"{sasl_service.url}/.well-known/openid-configuration"}
    dovecot.send(b"CONT\t7\tAQ==\n")  # the client's dummy answer, 0x01 (RFC 7628 §3.2.3)
    assert dovecot.line().startswith("FAIL\t7\treason=")
    assert dovecot.auth("8", "OAUTHBEARER", "pop3", oauthbearer(name, imap_only)).startswith("CONT\t8\t")


def test_xoauth2_failure_is_acknowledged_by_an_empty_response(dovecot, alice):
    line = dovecot.auth("4", "XOAUTH2", "smtp", xoauth2(alice[0], "no-such-token"))
    assert line.startswith("CONT\t4\t")
    assert json.loads(base64.b64decode(line.split("\t")[2]))["status"] == "invalid_token"
    dovecot.send(b"CONT\t4\t\n")
    assert dovecot.line().startswith("FAIL\t4\t")


def test_no_initial_response_gets_an_empty_challenge(dovecot, alice):
    name, token = alice
    assert dovecot.auth("5", "OAUTHBEARER", "smtp", None) == "CONT\t5\t"
    dovecot.send(f"CONT\t5\t{oauthbearer(name, token('smtp'))}\n".encode())
    assert dovecot.line() == f"OK\t5\tuser={name}"


def test_plain_with_a_token_only_where_enabled(dovecot, alice):
    name, token = alice
    both = token("imap smtp")
    plain = base64.b64encode(f"\x00{name}\x00{both}".encode()).decode()
    assert dovecot.auth("1", "PLAIN", "imap", plain) == f"OK\t1\tuser={name}"
    assert dovecot.auth("2", "PLAIN", "smtp", plain).startswith("FAIL\t2\t")


def test_exim_writes_its_handshake_and_auth_at_once(sasl_service, alice):
    name, token = alice
    exim = DovecotClient(("127.0.0.1", sasl_service.sasl_port), handshake=(
        f"VERSION\t1\t0\nCPID\t999\nAUTH\t1\tOAUTHBEARER\tservice=smtp\tsecured\trip=\tlip=\tnologin\t"
        f"resp={oauthbearer(name, token('smtp'))}\n").encode())
    assert exim.line() == f"OK\t1\tuser={name}"
    exim.close()


def test_prosody_gets_the_localpart_and_never_an_empty_challenge(sasl_service, alice):
    name, token = alice
    prosody = DovecotClient(("127.0.0.1", sasl_service.sasl_port), handshake=b"VERSION\t1\t1\nCPID\t77\n")
    xmpp = token("xmpp")
    prosody.send(f"AUTH\t3\tOAUTHBEARER\tservice=xmpp\tresp={oauthbearer(None, xmpp)}\n".encode())
    assert prosody.line() == f"OK\t3\tuser={name.split('@')[0]}"
    prosody.send(b"AUTH\t9\tOAUTHBEARER\tservice=xmpp\tresp==\n")  # Prosody's "no initial response"
    assert prosody.line().startswith("FAIL\t9\t")
    prosody.close()


def test_the_unix_socket(sasl_service, alice):
    name, token = alice
    client = DovecotClient(str(sasl_service.sasl_socket), family=socket.AF_UNIX)
    assert client.auth("1", "OAUTHBEARER", "imap", oauthbearer(name, token("imap"))) == f"OK\t1\tuser={name}"
    client.close()


def test_garbage_does_not_disturb_other_connections(sasl_service, alice, dovecot):
    name, token = alice
    smtp = token("smtp")
    hostile = DovecotClient(("127.0.0.1", sasl_service.sasl_port))
    hostile.send(b"\xff\xfe garbage\nAUTH\tx\nAUTH\t1\tOAUTHBEARER\tservice=smtp\tresp=!!!\n" + b"A" * 20000 + b"\n")
    assert dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, smtp)) == f"OK\t1\tuser={name}"
    hostile.close()
    half = DovecotClient(("127.0.0.1", sasl_service.sasl_port))
    half.send(b"AUTH\t1\tOAUTHBEARER\tservice=smtp\tresp=" + oauthbearer(name, smtp).encode())  # no newline
    half.sock.shutdown(socket.SHUT_WR)
    assert dovecot.auth("2", "OAUTHBEARER", "smtp", oauthbearer(name, smtp)) == f"OK\t2\tuser={name}"
    half.close()


def test_interleaved_requests_on_one_connection(dovecot, alice):
    name, token = alice
    good, bad = token("smtp"), "not-a-token"
    dovecot.send("".join(f"AUTH\t{i}\tOAUTHBEARER\tservice=smtp\tresp={oauthbearer(name, good if i % 2 else bad)}\n"
                         for i in range(1, 41)).encode())
    answers = dict((line.split("\t")[1], line.split("\t")[0]) for line in (dovecot.line() for _ in range(40)))
    assert all(answers[str(i)] == ("OK" if i % 2 else "CONT") for i in range(1, 41))


def test_revocation_here_takes_effect_at_once_and_from_the_cli_within_a_second(sasl_service, alice, dovecot):
    name, token = alice
    client = sasl_service.client("--redirect-uri", "https://app.example/cb", "--scope", "smtp")
    access = sasl_service.issue(name, client["client_id"], "smtp")
    assert dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, access)).startswith("OK")
    response = requests.post(f"{sasl_service.url}/revoke", data={"token": access},
                             auth=(client["client_id"], client["client_secret"]))
    assert response.status_code == 200
    assert dovecot.auth("2", "OAUTHBEARER", "smtp", oauthbearer(name, access)).startswith("CONT")  # at once

    other = token("smtp")
    assert dovecot.auth("3", "OAUTHBEARER", "smtp", oauthbearer(name, other)).startswith("OK")
    sasl_service.cli("token", "revoke", other)  # another process
    revoked_at = time.monotonic()
    for attempt in range(100):
        reply = dovecot.auth(str(100 + attempt), "OAUTHBEARER", "smtp", oauthbearer(name, other))
        if reply.startswith("CONT"):
            break
        time.sleep(0.05)
    assert reply.startswith("CONT"), "the CLI's revocation was never noticed"
    assert time.monotonic() - revoked_at <= 1.2


def test_expired_token(dovecot, alice):
    name, token = alice
    short = token("smtp", ttl="1")
    time.sleep(1.1)
    assert dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, short)).startswith("CONT")


def test_decisions_are_counted_and_logged_without_tokens(sasl_service, alice, dovecot):
    name, token = alice
    secret = token("smtp")
    dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, secret))
    metrics_client = sasl_service.client("--grant", "client_credentials", "--scope", "metrics")
    bearer = requests.post(f"{sasl_service.url}/token", data={"grant_type": "client_credentials"},
                           auth=(metrics_client["client_id"], metrics_client["client_secret"])).json()["access_token"]
    text = requests.get(f"{sasl_service.url}/metrics", headers={"Authorization": f"Bearer {bearer}"}).text
    assert 'bearerbridge_sasl_decisions_total{mechanism="OAUTHBEARER",reason="ok",result="ok",service="smtp",' \
           'surface="dovecot"}' in text
    time.sleep(0.3)  # decisions are written in batches, every quarter of a second
    log = sasl_service.log()
    assert f"auth ok: user='{name}' service='smtp' mechanism=OAUTHBEARER" in log and secret not in log


# -- POST /sasl -----------------------------------------------------------------------------------

def sasl_http(bearerbridge, caller, **form):
    return requests.post(f"{bearerbridge.url}/sasl", data=form, auth=(caller["client_id"], caller["client_secret"]))


def test_http_sasl_endpoint(sasl_service, alice):
    name, token = alice
    caller = sasl_service.client("--grant", "client_credentials", "--scope", "imap")
    smtp = token("smtp")
    ok = sasl_http(sasl_service, caller, mechanism="OAUTHBEARER", service="smtp", message=oauthbearer(name, smtp))
    assert ok.json() == {"result": "ok", "username": name}
    assert sasl_http(sasl_service, caller, mechanism="OAUTHBEARER", service="smtp", message="").json() == {
        "result": "challenge", "challenge": ""}
    refused = sasl_http(sasl_service, caller, mechanism="XOAUTH2", service="imap", message=xoauth2(name, smtp)).json()
    assert refused["result"] == "failure" and refused["reason"] == "insufficient_scope"
    assert json.loads(base64.b64decode(refused["challenge"]))["status"] == "insufficient_scope"
    malformed = sasl_http(sasl_service, caller, mechanism="OAUTHBEARER", service="smtp",
                          message=base64.b64encode(b"y,,\x01auth=Bearer x\x01\x01").decode()).json()
    assert malformed["result"] == "failure"
    assert json.loads(base64.b64decode(malformed["challenge"]))["status"] == "invalid_request"


def test_http_sasl_endpoint_refusals(sasl_service, alice):
    caller = sasl_service.client("--grant", "client_credentials", "--scope", "imap")
    bad_secret = {**caller, "client_secret": "wrong"}
    response = sasl_http(sasl_service, bad_secret, mechanism="OAUTHBEARER", service="smtp", message="")
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    response = sasl_http(sasl_service, caller, mechanism="CRAM-MD5", service="smtp", message="")
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    response = sasl_http(sasl_service, caller, mechanism="OAUTHBEARER", service="smtp", message="%%%")
    assert response.status_code == 400


def test_introspection_honours_dovecots_service_header(sasl_service, alice):
    name, token = alice
    caller = sasl_service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    smtp = token("smtp")
    assert introspect(sasl_service, caller, smtp)["active"]
    for service, active in (("smtp", True), ("imap", False), ("pop3", False)):
        response = requests.post(f"{sasl_service.url}/introspect", headers={"X-Dovecot-Auth-Service": service},
                                 data={"token": smtp, "client_id": caller["client_id"],
                                       "client_secret": caller["client_secret"]})
        assert response.json()["active"] is active

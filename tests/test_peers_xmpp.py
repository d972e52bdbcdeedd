"""A real Prosody 0.12 delegating XMPP SASL to bearerbridge over the Dovecot auth protocol.

Prosody runs as root from a throwaway config under the test's temporary directory (its own data
directory, pidfile and log, one c2s port on loopback) with Debian's prosody-modules'
mod_auth_dovecot pointed at bearerbridge's `[sasl] listen` TCP endpoint; the tests speak XMPP to it
over a raw socket, as a client would. See conf/prosody/bearerbridge.cfg.lua for the operator's
version. Prosody sends only `service=xmpp` and `resp=` (`resp==` when its client had no initial
response), keeps one connection with ids that are not consecutive, and escapes an `@` in the name
it is given, so the snippet reports the localpart.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from textwrap import dedent

import pytest

from .peers import ForegroundPeer, tail
from .support import Service, free_port, require_peer

pytestmark = pytest.mark.peer

WAIT = 20.0  # seconds: the bound on every wait in this module
DOMAIN = "example.test"
STREAM = "{http://etherx.jabber.org/streams}"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
SASL = "{" + SASL_NS + "}"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
BIND = "{" + BIND_NS + "}"
MOD_AUTH_DOVECOT = "/usr/lib/prosody/modules/mod_auth_dovecot/auth_dovecot/mod_auth_dovecot.lua"

SASL_CONFIG = """
[sasl]
listen = ["unix:{socket}:mode=660"]
cache_ttl = 0.5
[sasl.usernames]
xmpp = "localpart"
"""


# -- Prosody ---------------------------------------------------------------------------------------

class Prosody(ForegroundPeer):
    """`prosody -F` (in the foreground, so the PID is ours) from a config written under `directory`."""

    def __init__(self, directory: Path, sasl_socket: Path):
        self.directory = directory
        self.port = free_port()
        self.config_path = directory / "prosody.cfg.lua"
        self.log_path = directory / "prosody.log"
        self.output_path = directory / "prosody.out"
        self.process: subprocess.Popen | None = None
        data, certs = directory / "data", directory / "certs"
        for path in (data, certs):
            path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dedent(f"""\
            -- A throwaway Prosody for bearerbridge's tests (tests/test_peers_xmpp.py): loopback only.
            -- The test runs as root; Prosody's mod_posix refuses that without run_as_root.
            run_as_root = true
            data_path = "{data}"
            pidfile = "{directory / 'prosody.pid'}"
            log = {{ debug = "{self.log_path}" }}
            certificates = "{certs}"
            interfaces = {{ "127.0.0.1" }}
            c2s_ports = {{ {self.port} }}
            c2s_direct_tls_ports = {{ }}
            -- No server-to-server, no offline storage: nothing here but client logins.
            modules_enabled = {{ "saslauth" }}
            modules_disabled = {{ "s2s", "s2s_auth_certs", "offline" }}
            -- Test only: SASL without TLS on loopback (OAUTHBEARER is not among Prosody's
            -- insecure_sasl_mechanisms, so nothing else is needed to offer it).
            c2s_require_encryption = false
            authentication = "dovecot"
            dovecot_auth_socket = "{sasl_socket}"
            VirtualHost "{DOMAIN}"
            """))

    def log(self) -> str:
        return f"Prosody's log:\n{tail(self.log_path)}\nits output:\n{tail(self.output_path)}"

    def start(self, prosody: str) -> None:
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                [prosody, "-F", "--config", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.directory)
        deadline = time.monotonic() + WAIT
        while True:
            if not self.alive():
                raise RuntimeError(f"Prosody exited while starting ({self.process.returncode})\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prosody did not listen on 127.0.0.1:{self.port} within {WAIT:.0f}s\n{self.log()}")
            time.sleep(0.1)

    def instances(self) -> str:
        """Processes still running this test's config (there should be none after stop())."""
        found = subprocess.run(["pgrep", "-a", "-f", str(self.config_path)], capture_output=True, text=True)
        return found.stdout.strip()


# -- a minimal XMPP client -------------------------------------------------------------------------

class XmppClient:
    """A blocking client-to-server stream: open, read features, SASL, restart, bind."""

    def __init__(self, port: int, domain: str = DOMAIN):
        self.domain = domain
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.features = self.open_stream()

    def open_stream(self) -> ET.Element:
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth, self.pending, self.closed, self.restart_due = 0, [], False, False
        self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' version='1.0' xml:lang='en' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        features = self.element()
        assert features.tag == STREAM + "features", ET.tostring(features)
        return features

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def element(self) -> ET.Element:
        """The next top-level element the server sends (within WAIT seconds)."""
        deadline = time.monotonic() + WAIT
        while not self.pending:
            if self.closed:
                raise ConnectionError("the server closed the stream")
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Prosody")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.parser.feed(data)
            for event, elem in self.parser.read_events():
                if event == "start":
                    self.depth += 1
                    continue
                self.depth -= 1
                if self.depth == 1:
                    self.pending.append(elem)
                elif self.depth == 0:
                    self.closed = True
        return self.pending.pop(0)

    def mechanisms(self) -> list[str]:
        found = self.features.find(SASL + "mechanisms")
        return [] if found is None else [m.text for m in found.findall(SASL + "mechanism")]

    def auth(self, mechanism: str, message: bytes | None) -> ET.Element:
        """`<auth>`; None sends no initial response, b"" an empty one (`=`, RFC 6120 §6.4.2)."""
        if message is None:
            self.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'/>")
        else:
            text = base64.b64encode(message).decode() or "="
            self.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>{text}</auth>")
        return self.sasl_reply()

    def sasl_reply(self) -> ET.Element:
        reply = self.element()
        # after <success/> the old stream is gone: only a new stream header is well-formed now
        self.restart_due = reply.tag == SASL + "success"
        return reply

    def respond(self, message: bytes) -> ET.Element:
        text = base64.b64encode(message).decode()
        self.send(f"<response xmlns='{SASL_NS}'>{text}</response>" if text else f"<response xmlns='{SASL_NS}'/>")
        return self.sasl_reply()

    def bind(self, resource: str = "tests") -> str:
        """After `<success/>`: restart the stream and bind a resource; returns the full JID."""
        features = self.open_stream()
        assert features.find(BIND + "bind") is not None, ET.tostring(features)
        self.send(f"<iq type='set' id='bind-1'><bind xmlns='{BIND_NS}'><resource>{resource}</resource></bind></iq>")
        reply = self.element()
        assert reply.get("type") == "result", ET.tostring(reply)
        return reply.find(f"{BIND}bind/{BIND}jid").text

    def close(self) -> None:
        if not self.restart_due and not self.closed:
            try:
                self.send("</stream:stream>")
            except OSError:
                pass
        self.sock.close()


def oauthbearer(user: str | None, token: str) -> bytes:
    gs2 = f"n,a={user}," if user else "n,,"
    return f"{gs2}\x01host={DOMAIN}\x01port=5222\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def challenge_json(element: ET.Element) -> dict:
    assert element.tag == SASL + "challenge", ET.tostring(element)
    return json.loads(base64.b64decode(element.text or ""))


def is_not_authorized(element: ET.Element) -> bool:
    return element.tag == SASL + "failure" and element.find(SASL + "not-authorized") is not None


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xmpp(tmp_path_factory):
    """bearerbridge with a UNIX-socket `[sasl]` endpoint, and a Prosody authenticating against it, as
    conf/prosody/bearerbridge.cfg.lua sets them up."""
    prosody_binary = require_peer("prosody")
    require_peer(MOD_AUTH_DOVECOT)  # Debian's prosody-modules
    directory = tmp_path_factory.mktemp("xmpp")
    sasl_socket = directory / "auth"
    service = Service.start(directory, extra=SASL_CONFIG.format(socket=sasl_socket))
    # bearerbridge first: mod_auth_dovecot connects at load and gives up for good if it cannot.
    prosody = Prosody(directory / "prosody", sasl_socket)
    try:
        prosody.start(prosody_binary)
        yield service, prosody
    finally:
        prosody.stop()
        service.stop()
    left = prosody.instances()
    assert not left, f"Prosody processes outlived the tests:\n{left}"


@pytest.fixture
def prosody(xmpp, request):
    """The running Prosody: a failing test prints its log, and every test must leave it alive."""
    service, running = xmpp
    failed_before = request.session.testsfailed
    yield running
    if request.session.testsfailed > failed_before:  # the call phase's report precedes teardown
        print(running.log())
    assert running.alive(), f"Prosody died during the test\n{running.log()}"


@pytest.fixture
def client(prosody):
    connection = XmppClient(prosody.port)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def account(xmpp):
    """A user and a way to issue tokens for them with any scope."""
    service, _ = xmpp
    name = service.unique("user")
    service.cli("user", "add", name, "--password-stdin", stdin="pw\n")
    cid = service.client("--redirect-uri", "https://app.example/cb")["client_id"]

    def token(scope: str) -> str:
        return service.issue(name, cid, scope)
    return name, token


# -- tests -----------------------------------------------------------------------------------------

def test_prosody_offers_bearerbridges_mechanisms(client):
    assert "OAUTHBEARER" in client.mechanisms(), ET.tostring(client.features)
    assert "XOAUTH2" in client.mechanisms()
    assert "PLAIN" not in client.mechanisms()  # `[sasl] plain` is off for xmpp


@pytest.mark.parametrize("authzid", [False, True], ids=["no-authzid", "authzid"])
def test_an_xmpp_token_logs_in_and_binds_the_users_jid(client, account, prosody, authzid):
    name, token = account
    reply = client.auth("OAUTHBEARER", oauthbearer(name if authzid else None, token("xmpp")))
    assert reply.tag == SASL + "success", f"{ET.tostring(reply)}\n{prosody.log()}"
    assert client.bind() == f"{name}@{DOMAIN}/tests"


def test_xoauth2_logs_in_too(client, account, prosody):
    name, token = account
    reply = client.auth("XOAUTH2", xoauth2(name, token("xmpp")))
    assert reply.tag == SASL + "success", f"{ET.tostring(reply)}\n{prosody.log()}"
    assert client.bind() == f"{name}@{DOMAIN}/tests"


def test_a_user_named_like_an_address_gets_its_localpart_as_the_jid(client, xmpp, prosody):
    """`[sasl.usernames] xmpp = "localpart"`: without it Prosody makes `bob\\40x.org@example.test`."""
    service, _ = xmpp
    local = service.unique("bob")
    name = f"{local}@elsewhere.example"
    service.cli("user", "add", name, "--password-stdin", stdin="pw\n")
    cid = service.client("--redirect-uri", "https://app.example/cb")["client_id"]
    access = service.issue(name, cid, "xmpp")
    reply = client.auth("OAUTHBEARER", oauthbearer(None, access))
    assert reply.tag == SASL + "success", f"{ET.tostring(reply)}\n{prosody.log()}"
    assert client.bind() == f"{local}@{DOMAIN}/tests"


def test_a_token_without_the_xmpp_scope_is_refused_as_rfc_7628_says(client, account, xmpp):
    name, token = account
    challenge = client.auth("OAUTHBEARER", oauthbearer(name, token("smtp")))
    assert challenge_json(challenge) == {
        "status": "insufficient_scope", "scope": "xmpp",
        "openid-configuration": f"{xmpp[0].url}/.well-known/openid-configuration"}
    assert is_not_authorized(client.respond(b"\x01"))  # <response>AQ==</response>


def test_a_revoked_token_is_refused(client, account, xmpp, prosody):
    service, _ = xmpp
    name, token = account
    access = token("xmpp")
    assert client.auth("OAUTHBEARER", oauthbearer(name, access)).tag == SASL + "success"
    client.close()
    service.cli("token", "revoke", access)
    # The CLI is another process: seen within cache_ttl (0.5 s), plus the length of one attempt.
    deadline = time.monotonic() + 0.5 + 0.5
    while True:
        attempt = XmppClient(prosody.port)
        try:
            reply = attempt.auth("OAUTHBEARER", oauthbearer(name, access))
            if reply.tag == SASL + "challenge":
                assert challenge_json(reply)["status"] == "invalid_token"
                assert is_not_authorized(attempt.respond(b"\x01"))
                break
            assert reply.tag == SASL + "success", ET.tostring(reply)
        finally:
            attempt.close()
        assert time.monotonic() < deadline, "the revocation was never noticed"
        time.sleep(0.2)


def test_an_unknown_token_is_refused_and_the_next_login_works(client, account, prosody):
    name, token = account
    challenge = client.auth("OAUTHBEARER", oauthbearer(name, "not-a-token-we-issued"))
    assert challenge_json(challenge)["status"] == "invalid_token"
    assert is_not_authorized(client.respond(b"\x01"))
    # the same stream may try again (Prosody keeps its one Dovecot connection throughout)
    assert client.auth("OAUTHBEARER", oauthbearer(name, token("xmpp"))).tag == SASL + "success"


def test_xoauth2_failure_is_acknowledged_by_an_empty_response(client, account):
    name, _ = account
    challenge = client.auth("XOAUTH2", xoauth2(name, "not-a-token-we-issued"))
    assert challenge_json(challenge)["status"] == "invalid_token"
    assert client.respond(b"").tag == SASL + "failure"


@pytest.mark.parametrize("message", [None, b""], ids=["no-initial-response", "empty-initial-response"])
def test_no_initial_response_fails_cleanly_and_prosody_survives(client, account, prosody, message):
    """Prosody turns both into a Dovecot AUTH (`resp==` / `resp=`); an empty CONT would crash it."""
    name, token = account
    reply = client.auth("OAUTHBEARER", message)
    assert reply.tag in (SASL + "failure", SASL + "challenge"), ET.tostring(reply)
    if reply.tag == SASL + "challenge":  # a non-empty challenge is fine, then it must still end cleanly
        assert reply.text and reply.text != "="
        reply = client.respond(oauthbearer(name, token("xmpp")))
        assert reply.tag == SASL + "success", ET.tostring(reply)
    again = XmppClient(prosody.port)
    try:
        assert again.auth("OAUTHBEARER", oauthbearer(name, token("xmpp"))).tag == SASL + "success", prosody.log()
    finally:
        again.close()

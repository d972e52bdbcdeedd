"""The HTTP surfaces noting a grant's use (uses.py) in process: /userinfo (from the HTTP peer),
/forward-auth (the rule's service, the client's address as the proxy forwards it), a resource
server's /introspect (the service Dovecot names, else "introspection", and the client address it
names; from the pool and from memory) and POST /sasl; each writes a row once flushed, and a refused
token writes none."""

from __future__ import annotations

import base64
import dataclasses
import json
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from bearerbridge.config import Config, ForwardAuthRule, ForwardAuthSettings
from bearerbridge.metrics import Metrics
from bearerbridge.storage.models import Client
from bearerbridge.uses import UseRecorder
from bearerbridge.web.forward import forwarded_address

from ..fakes import Bridge, sqlite_store
from ..test_uses import family_of, written

NOW = 1_700_000_000
RULES = (ForwardAuthRule(host="Files.Example.", read_scope="files:read", write_scope="files:write"),
         ForwardAuthRule(path_prefix="/"))  # webdav:read, webdav:write
# alice's tokens, by what they hold
TOKENS = {"oidc": "openid email", "imap": "imap", "dav": "webdav:read files:read", "smtp": "smtp"}


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db", clock=lambda: 0.0)  # what it reads stays remembered
    with store.transaction():
        store.add_client(Client("app", "App", ("https://app.example/cb",), " ".join(TOKENS.values()),
                                ("authorization_code",), public=False), "app-secret")
        store.add_client(Client("rs", "IMAP server", (), "imap", ("client_credentials",), False,
                                resource_server=True), "rs-secret")
        alice = store.add_user("alice", "alice@example.org", None)
        for token, scope in TOKENS.items():
            store.save_token(token, None, "app", alice.id, scope, 3600, None)
    config = dataclasses.replace(Config(), forward_auth=ForwardAuthSettings(rules=RULES))
    bridge = Bridge.over(store, config)
    bridge.clock.rightNow = NOW  # when uses are noted; the tokens' expiry is the store's own time
    yield bridge
    store.engine.dispose()


def flushed(bridge: Bridge) -> set[tuple]:
    """Write what the tree noted (as the running service does every few seconds); every row."""
    UseRecorder(bridge.uses, bridge.pool, Metrics(), clock=bridge.clock).flush()
    return written(bridge.store)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_userinfo_notes_a_use_from_the_http_peer(bridge):
    assert bridge.browser().get("/userinfo", headers=bearer("oidc")).code == 200
    [(family, service, at, address)] = flushed(bridge)
    assert (family, service, at) == (family_of(bridge.store, "oidc"), "userinfo", NOW)
    assert address == "127.0.0.1"  # StubTreq's peer


def test_userinfo_refused_notes_nothing(bridge):
    assert bridge.browser().get("/userinfo", headers=bearer("imap")).code == 403  # no openid scope
    assert bridge.browser().get("/userinfo", headers=bearer("unknown")).code == 401
    assert flushed(bridge) == set()


def nginx(bridge: Bridge, token: str, host: str = "dav.example", method: str = "GET", **headers: str) -> int:
    return bridge.browser().get("/forward-auth", headers={
        "Host": host, "X-Original-Method": method, "X-Original-URI": "/alice/notes.txt", **bearer(token),
        **headers}).code


def test_forward_auth_notes_a_use_at_the_rules_service(bridge):
    assert nginx(bridge, "dav") == 200
    assert nginx(bridge, "dav", host="files.example") == 200
    dav = family_of(bridge.store, "dav")
    assert flushed(bridge) == {(dav, "webdav", NOW, None), (dav, "files.example", NOW, None)}  # no X-Forwarded-For


def test_forward_auth_refused_notes_nothing(bridge):
    assert nginx(bridge, "imap") == 403  # no webdav scope
    assert nginx(bridge, "dav", method="PUT") == 403  # reads only
    assert nginx(bridge, "unknown") == 401
    assert flushed(bridge) == set()


def test_a_rules_service_is_its_host_else_its_read_scopes_name():
    assert RULES[0].service == "files.example"
    assert RULES[1].service == "webdav"
    assert ForwardAuthRule(read_scope="calendar").service == "calendar"


def test_the_forwarded_address_is_the_clients_from_a_trusted_proxy_and_none_without_one():
    request = DummyRequest([b"forward-auth"])
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    request.site = SimpleNamespace(trusted_proxies=frozenset({"127.0.0.1"}))
    assert forwarded_address(request) is None  # the proxy's own address says nothing of the client
    request.requestHeaders.setRawHeaders(b"X-Forwarded-For", [b"10.0.0.1, 203.0.113.9"])
    assert forwarded_address(request) == "203.0.113.9"


def introspect(bridge: Bridge, token: str, client: tuple[str, str] = ("rs", "rs-secret"),
               service: str | None = None, remote: str | None = None) -> dict:
    headers = {"X-Dovecot-Auth-Service": service} if service else {}
    if remote is not None:
        headers["X-Dovecot-Auth-Remote"] = remote
    answer = bridge.browser().post("/introspect", data={"token": token}, auth=client, headers=headers)
    assert answer.code == 200
    return json.loads(answer.body)


def test_a_resource_servers_introspection_notes_a_use_from_the_pool_and_from_memory(bridge):
    imap = family_of(bridge.store, "imap")
    assert introspect(bridge, "imap", service="imap")["active"]  # first, through the pool
    hops = bridge.pool.hops
    assert flushed(bridge) == {(imap, "imap", NOW, None)}
    bridge.clock.advance(60)
    assert introspect(bridge, "imap", service="imap")["active"]  # from memory now (no trip to the pool)
    assert introspect(bridge, "imap")["active"]  # no service named
    assert bridge.pool.hops == hops + 1  # the one write
    assert flushed(bridge) == {(imap, "imap", NOW + 60, None), (imap, "introspection", NOW + 60, None)}


def test_introspection_notes_no_use_of_an_inactive_token_nor_a_clients_own(bridge):
    assert not introspect(bridge, "imap", service="smtp")["active"]  # not for that service
    assert not introspect(bridge, "unknown")["active"]
    assert introspect(bridge, "imap", client=("app", "app-secret"))["active"]  # the app's own token
    assert flushed(bridge) == set()


def test_a_resource_servers_introspection_notes_the_address_dovecot_names(bridge):
    """Dovecot's send_auth_headers: `X-Dovecot-Auth-Remote: ip:port` (tests/test_peers_account.py
    sees it from the real one); the port goes, an IPv6 address loses its brackets."""
    imap = family_of(bridge.store, "imap")
    assert introspect(bridge, "imap", service="imap", remote="192.0.2.7:51234")["active"]  # through the pool
    assert flushed(bridge) == {(imap, "imap", NOW, "192.0.2.7")}
    bridge.clock.advance(60)
    hops = bridge.pool.hops
    assert introspect(bridge, "imap", service="imap", remote="[2001:db8::1]:993")["active"]  # from memory
    assert bridge.pool.hops == hops
    assert flushed(bridge) == {(imap, "imap", NOW + 60, "2001:db8::1")}


@pytest.mark.parametrize("header", ["", "not an address", "192.0.2.7:1:2", "[2001:db8::1", "mail.example:993",
                                    "999.0.0.1:143"])
def test_an_address_dovecot_did_not_name_well_is_noted_as_none(bridge, header):
    assert introspect(bridge, "imap", service="imap", remote=header)["active"]
    assert flushed(bridge) == {(family_of(bridge.store, "imap"), "imap", NOW, None)}


def test_the_remote_header_counts_for_nothing_from_a_client_that_is_no_resource_server(bridge):
    """Anyone can send the header: from a client introspecting its own token it notes nothing."""
    assert introspect(bridge, "imap", client=("app", "app-secret"), remote="192.0.2.7:51234")["active"]
    assert flushed(bridge) == set()


def test_post_sasl_notes_a_use_at_its_service_and_a_refusal_none(bridge):
    http = bridge.browser()

    def post(token: str, service: str) -> dict:
        message = base64.b64encode(f"n,,\x01auth=Bearer {token}\x01\x01".encode()).decode()
        answers = http.pending("POST", "/sasl", data={"mechanism": "OAUTHBEARER", "service": service,
                                                      "message": message}, auth=("rs", "rs-secret"))
        bridge.clock.advance(10)  # a failure is answered late
        http.flush()
        return json.loads(answers[0].body)

    assert post("smtp", "smtp")["result"] == "ok"
    assert post("smtp", "imap")["result"] == "failure"
    assert post("unknown", "smtp")["result"] == "failure"
    assert flushed(bridge) == {(family_of(bridge.store, "smtp"), "smtp", NOW + 30, None)}  # dated when taken

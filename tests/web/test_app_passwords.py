"""App passwords in process (issue 12), over the whole HTTP tree, a Dovecot auth connection over
the real validator, and a real SQLite store: made on /account/app-passwords (shown once, only the
digest kept), taken as the PLAIN password on the Dovecot socket and as HTTP Basic's at
/forward-auth for exactly its services and its user, refused once revoked or expired, with two-
factor sign-in on too; the audit events, the first use written by the use recorder, the CSRF
token of the forms, and the operator's `[sasl] app_passwords`."""

from __future__ import annotations

import base64
import re
import time

import pyotp
import pytest
import sqlalchemy as sa
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bearerbridge.config import Config, ConfigError, ForwardAuthRule, ForwardAuthSettings, SaslSettings, parse
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.dovecot import DovecotAuthProtocol
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.schema import app_passwords, token_uses
from bearerbridge.uses import UseRecorder

from ..fakes import Bridge, Http, cheap_password_hash, form_of, sqlite_store

PASSWORD = "correct horse battery"
CONFIG = Config(sasl=SaslSettings(plain=("smtp", "imap")),
                forward_auth=ForwardAuthSettings(rules=(ForwardAuthRule(basic=True),)))


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_user("alice", "alice@example.org", cheap_password_hash(PASSWORD))
        store.add_user("bob", None, cheap_password_hash(PASSWORD))
    yield Bridge.over(store, CONFIG)
    store.engine.dispose()


def signed_in(bridge: Bridge, username: str = "alice") -> Http:
    browser = bridge.browser()
    action, fields = form_of(browser.get("/account"))
    answer = browser.post(action, data={**fields, "username": username, "password": PASSWORD})
    assert answer.code == 303, answer.body
    return browser


def csrf(browser: Http) -> str:
    return form_of(browser.get("/account/app-passwords"))[1]["csrf"]


def make(browser: Http, name: str = "Thunderbird", services: tuple[str, ...] = ("smtp",), expiry: str = "never"
         ) -> tuple[int, str]:
    """Make an app password on the page; (its id, the secret the page showed)."""
    answer = browser.post("/account/app-passwords", data={
        "csrf": csrf(browser), "step": "create", "name": name, "expiry": expiry,
        **{f"service:{s}": "on" for s in services}})
    assert answer.code == 200, answer.body
    page = answer.body.decode()
    secret = re.search(r'<code class="secret" id="secret">([^<]+)</code>', page)
    assert secret is not None, page
    return int(re.findall(r'id="app-password-(\d+)"', page)[0]), secret[1]


class Socket:
    """A Dovecot auth connection over its own Validator on the bridge's store (sharing its memory
    of recent reads, as every surface of one process does), on a Clock at wall-clock time."""

    def __init__(self, bridge: Bridge) -> None:
        self.clock = Clock()
        self.clock.rightNow = time.time()
        self.protocol = DovecotAuthProtocol(Validator(bridge.pool, bridge.config.sasl, clock=self.clock).validate,
                                            clock=self.clock, uses=bridge.uses)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"VERSION\t1\t0\nCPID\t1\n")
        self.transport.clear()
        self.ids = 0

    def login(self, user: str, password: str, service: str = "smtp", mechanism: str = "PLAIN") -> bytes:
        self.ids += 1
        message = (f"\x00{user}\x00{password}" if mechanism == "PLAIN"
                   else f"n,a={user},\x01auth=Bearer {password}\x01\x01")
        resp = base64.b64encode(message.encode()).decode()
        self.protocol.dataReceived(f"AUTH\t{self.ids}\t{mechanism}\tservice={service}\tnologin\tlip=127.0.0.1"
                                   f"\trip=192.0.2.7\tresp={resp}\n".encode())
        self.clock.advance(5)  # a refusal is answered after the throttle's delay
        answer = self.transport.value()
        self.transport.clear()
        return answer.split(b"\t")[0] + b"\t" + answer.split(b"\t", 2)[2] if answer.startswith(b"OK") else answer


def ok(answer: bytes) -> bool:
    return answer.startswith(b"OK\t")


def basic(bridge: Bridge, user: str, password: str, method: str = "PROPFIND") -> tuple[int, str | None]:
    answer = bridge.browser().get("/forward-auth", headers={
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
        "X-Original-Method": method, "X-Original-URI": "/dav/alice/"})
    return answer.code, answer.header("X-Auth-User")


def test_an_app_password_is_shown_once_and_only_its_digest_is_kept(bridge):
    browser = signed_in(bridge)
    app_id, secret = make(browser, "Thunderbird", ("smtp", "webdav"), "90")
    assert re.fullmatch(r"([a-hj-km-np-z]{4}-){5}[a-hj-km-np-z]{4}", secret)  # ~108 random bits, typeable
    assert secret not in browser.get("/account/app-passwords").body.decode()
    page = browser.get("/account").body.decode()
    assert secret not in page and f'id="app-password-{app_id}"' in page
    listed = page[page.index(f'id="app-password-{app_id}"'):]
    assert "Thunderbird" in listed and "Opens smtp, webdav." in listed and "Not used yet." in listed
    with bridge.store.transaction():
        row = bridge.store._db.execute(app_passwords.select()).one()
    assert row.digest == bridge.store.keyring.digest(secret) and secret not in str(tuple(row))
    assert row.services == "smtp webdav" and 89 * 86400 < row.expires_at - time.time() <= 90 * 86400
    [created] = bridge.audit.of("app_password_created")
    assert created["user"] == "alice" and created["family"] == f"app:{app_id}" and created["name"] == "Thunderbird"
    assert created["services"] == ["smtp", "webdav"] and secret not in str(bridge.audit.events)


def test_the_page_refuses_a_nameless_one_no_service_and_a_service_it_does_not_offer(bridge):
    browser = signed_in(bridge)
    page = browser.get("/account/app-passwords").body.decode()
    assert all(f'id="service-{s}"' in page for s in ("smtp", "imap", "webdav")) and 'id="service-xmpp"' not in page
    for fields, words in [({"name": "", "service:smtp": "on"}, "Give the app password a name"),
                          ({"name": "x"}, "Pick at least one service"),
                          ({"name": "x", "service:xmpp": "on"}, "cannot open xmpp"),
                          ({"name": "x", "service:smtp": "on", "expiry": "1000"}, "Pick when")]:
        answer = browser.post("/account/app-passwords", data={"csrf": csrf(browser), "step": "create",
                                                              "expiry": "30", **fields})
        assert answer.code == 400 and words in answer.body.decode(), fields
    with bridge.store.transaction():
        assert bridge.store.app_passwords(1) == []


def test_plain_on_the_dovecot_socket_takes_it_for_its_services_and_its_user_only(bridge):
    _, secret = make(signed_in(bridge), services=("smtp",))
    socket = Socket(bridge)
    assert socket.login("alice", secret) == b"OK\tuser=alice\n"
    assert socket.login("alice@example.org", secret) == b"OK\tuser=alice\n"  # [sasl] identity: email too
    assert socket.login("alice", secret) == b"OK\tuser=alice\n"  # from memory now
    assert socket.login("alice", secret, service="imap").startswith(b"FAIL\t")  # not made for imap
    assert socket.login("bob", secret).startswith(b"FAIL\t")  # another user's name
    assert socket.login("", secret).startswith(b"FAIL\t")
    assert not ok(socket.login("alice", secret, mechanism="OAUTHBEARER"))  # a password, never a bearer token
    assert socket.login("alice", secret[:-1] + "x").startswith(b"FAIL\t")


def test_a_token_as_the_plain_password_still_works_beside_app_passwords(bridge):
    make(signed_in(bridge), services=("smtp",))
    with bridge.store.transaction():
        from bearerbridge.storage.models import Client
        bridge.store.add_client(Client("app", "App", (), "smtp", ("authorization_code",), False), "s")
        bridge.store.save_token("a-token", None, "app", 1, "smtp", 3600, None)
    assert Socket(bridge).login("alice", "a-token") == b"OK\tuser=alice\n"


def test_basic_at_forward_auth_takes_it_for_the_rules_service(bridge):
    browser = signed_in(bridge)
    _, webdav = make(browser, "Files", ("webdav",))
    _, smtp = make(browser, "Relay", ("smtp",))
    assert basic(bridge, "alice", webdav) == (200, "alice")
    assert basic(bridge, "alice", webdav, "PUT") == (200, "alice")
    assert basic(bridge, "alice", smtp) == (401, None)  # made for smtp only
    assert basic(bridge, "bob", webdav) == (401, None)
    assert basic(bridge, "", webdav) == (401, None)
    bearer = bridge.browser().get("/forward-auth", headers={"Authorization": f"Bearer {webdav}",
                                                            "X-Original-URI": "/dav/alice/"})
    assert bearer.code == 401  # a password is no bearer token
    assert Socket(bridge).login("alice", webdav).startswith(b"FAIL\t")  # nor a webdav one a mail password


def test_revoked_it_stops_at_once_even_when_remembered(bridge):
    browser = signed_in(bridge)
    app_id, secret = make(browser, services=("smtp", "webdav"))
    socket = Socket(bridge)
    assert ok(socket.login("alice", secret)) and basic(bridge, "alice", secret)[0] == 200
    page = browser.get("/account").body.decode()  # revoked from the list on /account
    answer = browser.post("/account/app-passwords", data={"csrf": form_of(browser.get("/account"))[1]["csrf"],
                                                          "step": "revoke", "id": str(app_id)})
    assert answer.code == 200 and "revoked: it no longer opens anything" in answer.body.decode()
    assert f'id="revoke-app-password-{app_id}"' in page
    assert socket.login("alice", secret).startswith(b"FAIL\t")
    assert basic(bridge, "alice", secret) == (401, None)
    assert f'id="app-password-{app_id}"' not in browser.get("/account").body.decode()
    [revoked] = bridge.audit.of("app_password_revoked")
    assert revoked["user"] == "alice" and revoked["family"] == f"app:{app_id}"
    again = browser.post("/account/app-passwords", data={"csrf": csrf(browser), "step": "revoke", "id": str(app_id)})
    assert again.code == 400


def test_another_user_cannot_revoke_it(bridge):
    app_id, secret = make(signed_in(bridge))
    bob = signed_in(bridge, "bob")
    answer = bob.post("/account/app-passwords", data={"csrf": csrf(bob), "step": "revoke", "id": str(app_id)})
    assert answer.code == 400 and ok(Socket(bridge).login("alice", secret))


def test_expired_it_is_refused(bridge):
    _, secret = make(signed_in(bridge), services=("smtp",), expiry="30")
    socket = Socket(bridge)
    assert ok(socket.login("alice", secret))
    socket.clock.advance(30 * 86400)  # remembered, and judged on the clock
    assert socket.login("alice", secret).startswith(b"FAIL\t")
    _, other = make(signed_in(bridge), "Old", services=("smtp",))
    with bridge.store.transaction():  # expired in the database
        bridge.store._db.execute(app_passwords.update().where(app_passwords.c.name == "Old")
                                 .values(expires_at=int(time.time()) - 1))
    assert Socket(bridge).login("alice", other).startswith(b"FAIL\t")


def test_it_works_with_two_factor_sign_in_on(bridge):
    _, secret = make(signed_in(bridge), services=("smtp",))
    key = pyotp.random_base32()
    with bridge.store.transaction():
        assert bridge.store.begin_totp(1, key)
        assert bridge.store.confirm_totp(1, pyotp.TOTP(key).now(), ["r" * 10])
        assert bridge.store.two_factor_enabled(1)
    assert ok(Socket(bridge).login("alice", secret))


def test_its_uses_are_listed_and_the_first_one_audited_once(bridge):
    browser = signed_in(bridge)
    app_id, secret = make(browser, services=("smtp", "webdav"))
    socket = Socket(bridge)
    assert ok(socket.login("alice", secret))
    recorder = UseRecorder(bridge.uses, bridge.pool, Metrics(), audit=bridge.audit)
    recorder.flush()
    [first] = bridge.audit.of("app_password_first_use")
    assert first == {"user": "alice", "family": f"app:{app_id}", "name": "Thunderbird", "services": ["smtp"],
                     "address": "192.0.2.7"}
    assert ok(socket.login("alice", secret)) and basic(bridge, "alice", secret)[0] == 200
    recorder.flush()
    assert len(bridge.audit.of("app_password_first_use")) == 1
    listed = browser.get("/account").body.decode()
    listed = listed[listed.index(f'id="app-password-{app_id}"'):]
    assert "<strong>smtp</strong>" in listed and "from 192.0.2.7" in listed and "<strong>webdav</strong>" in listed
    with bridge.store.transaction():  # kept by the purge while the app password is there
        bridge.store.purge_expired()
        assert len(bridge.store._db.execute(sa.select(token_uses)).all()) == 2


def test_the_forms_need_the_csrf_token(bridge):
    browser = signed_in(bridge)
    for token in ("", "forged"):
        answer = browser.post("/account/app-passwords", data={"csrf": token, "step": "create", "name": "x",
                                                              "service:smtp": "on", "expiry": "30"})
        assert answer.code == 400 and "The form has expired" in answer.body.decode()
    app_id, _ = make(browser)
    other = signed_in(bridge)  # another browser's token
    answer = browser.post("/account/app-passwords", data={"csrf": csrf(other), "step": "revoke", "id": str(app_id)})
    assert answer.code == 400 and "The form has expired" in answer.body.decode()
    with bridge.store.transaction():
        assert [item.password.id for item in bridge.store.app_passwords(1)] == [app_id]
    assert bridge.browser().get("/account/app-passwords").code == 303  # no session: /account


def test_the_operator_can_forbid_them_per_service(tmp_path):
    store = sqlite_store(tmp_path / "y.db")
    with store.transaction():
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
    config = Config(sasl=SaslSettings(plain=("smtp", "imap"), app_passwords=("imap",)),
                    forward_auth=ForwardAuthSettings(rules=(ForwardAuthRule(basic=True),)))
    bridge = Bridge.over(store, config)
    assert list(config.app_password_services) == ["imap"]
    browser = signed_in(bridge)
    assert 'id="service-smtp"' not in browser.get("/account/app-passwords").body.decode()
    _, secret = make(browser, services=("imap",))
    with store.transaction():  # made when the operator still allowed more
        store._db.execute(app_passwords.update().values(services="imap smtp webdav"))
    socket = Socket(bridge)
    assert ok(socket.login("alice", secret, service="imap"))
    assert socket.login("alice", secret, service="smtp").startswith(b"FAIL\t")
    assert basic(bridge, "alice", secret) == (401, None)
    store.engine.dispose()


def test_the_config_names_only_services_taking_plain_or_basic():
    assert Config().app_password_services == {}  # neither PLAIN nor Basic anywhere by default
    assert parse({"sasl": {"plain": ["smtp"], "app_passwords": ["smtp"]}}).sasl.app_passwords == ("smtp",)
    for names in (["imap"], ["webdav"], ["nope"]):
        with pytest.raises(ConfigError, match=r"\[sasl\] app_passwords"):
            parse({"sasl": {"plain": ["smtp"], "app_passwords": names}})
    basic_rule = {"forward_auth": {"rules": [{"basic": True}]}}
    assert parse({**basic_rule, "sasl": {"app_passwords": ["webdav"]}}).app_password_services == {
        "webdav": "Read your files (WebDAV); Change and delete your files (WebDAV)"}

"""The decisions around the webauthn library (bearerbridge/passkeys.py) and the passkeys table
(storage/passkeys.py), without a browser: the RP ID refused for an IP address, a challenge
spent once and forgotten after its lifetime, the amr values, the counter that only goes forward,
one user handle per user. Then web/passkeys.py over the whole HTTP tree in process, with
`SoftAuthenticator` (a key in this process answering as a browser would, what any script can
do): an answer accepted once and its challenge spent only when it verifies, for its user only,
so that one user's flood refuses nobody else; a credential id longer than the passkeys table
keeps refused. The browser's side: tests/test_browser_passkeys.py."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import secrets
from html.parser import HTMLParser

import cbor2  # the webauthn library's own CBOR
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from webauthn.helpers import bytes_to_base64url

from bearerbridge import config as configuration
from bearerbridge import passkeys
from bearerbridge.passkeys import Assertion, NewPasskey, PasskeyRefused, RelyingParty, SpentChallenges
from bearerbridge.storage import schema

from .fakes import Bridge, Http, cheap_password_hash, form_of, sqlite_store

PASSWORD = "correct horse battery"
RP = RelyingParty("localhost", "http://localhost:8080", "bearerbridge")


def test_the_relying_party_is_the_issuers_host_name_and_none_for_an_ip_address():
    assert RelyingParty.of("http://localhost:8080", "bb") == RelyingParty("localhost", "http://localhost:8080", "bb")
    assert RelyingParty.of("https://id.example.org/", "bb").id == "id.example.org"
    assert RelyingParty.of("http://127.0.0.1:8080", "bb") is None
    assert RelyingParty.of("http://[::1]:8080", "bb") is None


def test_a_challenge_is_spent_once_and_forgotten_after_its_lifetime():
    spent = SpentChallenges()
    assert spent.spend(1, "c1", 1000.0)
    assert not spent.spend(1, "c1", 1000.0 + passkeys.CHALLENGE_TTL - 1)
    assert spent.spend(1, "c2", 1000.0)
    assert spent.spend(1, "c1", 1000.0 + passkeys.CHALLENGE_TTL + 1)  # its signature has expired by then anyway


def test_a_full_memory_refuses_rather_than_forgets_but_only_the_user_who_filled_it():
    spent = SpentChallenges(per_user=3)
    assert all(spent.spend(1, f"c{i}", 0.0) for i in range(3))
    assert not spent.spend(1, "c3", 1.0)
    assert not spent.spend(1, "c0", 1.0)  # still remembered: a replay
    assert spent.spend(2, "c3", 1.0) and spent.spend(2, "c0", 1.0)
    assert spent.spend(1, "c3", passkeys.CHALLENGE_TTL + 1.0)  # the flood has expired


def test_users_gone_quiet_are_swept_out_of_memory():
    spent = SpentChallenges()
    for user in range(1000):
        assert spent.spend(user, "c", 0.0)
    assert spent.spend(5000, "c", 2.0 * passkeys.CHALLENGE_TTL)
    assert list(spent._spent) == [5000]


def test_amr_says_what_the_passkey_proved():
    assert Assertion(1, True, hardware=True).amr(after_password=False) == ("hwk", "user", "mfa")
    assert Assertion(1, False, hardware=True).amr(after_password=True) == ("pwd", "hwk", "user", "mfa")
    assert Assertion(0, True, hardware=False).amr(after_password=False) == ("swk", "user", "mfa")
    assert Assertion(0, False, hardware=False).amr(after_password=False) == ("swk", "user")


def test_options_carry_the_rp_the_user_handle_and_the_challenge():
    rp = RelyingParty("localhost", "http://localhost:1", "bb")
    handle, challenge = passkeys.new_user_handle(), passkeys.new_challenge()
    created = json.loads(passkeys.registration_options(rp, challenge, "alice", handle, []))
    assert created["rp"] == {"id": "localhost", "name": "bb"} and created["user"]["id"] == handle
    assert created["challenge"] == challenge and created["authenticatorSelection"]["residentKey"] == "required"
    got = json.loads(passkeys.authentication_options(rp, challenge))
    assert got["userVerification"] == "required" and got["allowCredentials"] == []


@pytest.mark.parametrize("credential", ["", "{", "[]", '{"id": 5}', '{"id": "!!"}', '{"response": {}}',
                                        json.dumps({"id": "A" * (passkeys.CREDENTIAL_ID_CHARS + 1)}),
                                        json.dumps({"id": "AA", "response": {"userHandle": "A" * 87}})])
def test_a_malformed_answer_is_refused(credential):
    with pytest.raises(PasskeyRefused):
        passkeys.parse(credential)


def test_the_longest_credential_id_accepted_fits_the_passkeys_table():
    assert schema.passkeys.c.credential_id.type.length == passkeys.CREDENTIAL_ID_CHARS
    assert passkeys.parse(json.dumps({"id": "A" * passkeys.CREDENTIAL_ID_CHARS})) == ("A" * 1024, None)
    longest = SoftAuthenticator(secrets.token_bytes(768))
    assert len(passkeys.verify_registration(RP, "Y2g", longest.create(RP, "Y2g")).credential_id) == 1024


@pytest.mark.parametrize("length", [769, 1023])
def test_a_registration_with_a_credential_id_longer_than_the_table_keeps_is_refused(length):
    """WebAuthn allows 1023 bytes; the column holds 768 (1024 base64url characters): refused, as
    malformed, instead of an insert failing on PostgreSQL."""
    too_long = SoftAuthenticator(secrets.token_bytes(length))
    with pytest.raises(PasskeyRefused, match=f"credential id of {length} bytes"):
        passkeys.verify_registration(RP, "Y2g", too_long.create(RP, "Y2g"))


def test_the_counter_only_goes_forward_and_a_user_keeps_one_handle(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        user = store.add_user("alice", None, cheap_password_hash("pw"))
    uid = user.id if hasattr(user, "id") else user
    with store.transaction():
        assert store.passkey_handle(uid) is None
        assert store.add_passkey(uid, "h" * 43, NewPasskey("cred-1", "key", 5, "internal"), "Laptop")
        assert not store.add_passkey(uid, "h" * 43, NewPasskey("cred-1", "key", 5, "internal"), "Again")
        assert store.passkey_handle(uid) == "h" * 43
        assert store.passkey_used("cred-1", 6)
        assert not store.passkey_used("cred-1", 6)  # the same count again: a replay or a clone
        assert not store.passkey_used("cred-1", 3)
        assert store.passkey("cred-1").sign_count == 6
        assert uid in store.second_factor_users()
        assert store.reset_second_factor(uid) and store.passkeys(uid) == []
    store.engine.dispose()


# -- a software authenticator and the whole tree in process ---------------------------------------

def b64(data: bytes) -> str:
    return bytes_to_base64url(data)


class SoftAuthenticator:
    """A passkey in this process: a P-256 key, a "none" attestation (it has no signature: any
    script makes one), a counter that stays 0 (as a synced passkey's does). Answers are JSON as
    /static/passkeys.js posts them."""

    def __init__(self, credential_id: bytes | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = credential_id or secrets.token_bytes(16)
        self.handle = ""

    def _client_data(self, kind: str, challenge: str, rp: RelyingParty) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": rp.origin, "crossOrigin": False}).encode()

    def create(self, rp: RelyingParty, challenge: str, handle: str = "") -> str:
        self.handle = handle
        point = self.key.public_key().public_numbers()
        cose = cbor2.dumps({1: 2, 3: -7, -1: 1, -2: point.x.to_bytes(32, "big"), -3: point.y.to_bytes(32, "big")})
        auth_data = (hashlib.sha256(rp.id.encode()).digest() + bytes([0x45]) + bytes(4) + bytes(16)
                     + len(self.credential_id).to_bytes(2, "big") + self.credential_id + cose)  # UP, UV, AT
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        return json.dumps({"id": b64(self.credential_id), "rawId": b64(self.credential_id), "type": "public-key",
                           "clientExtensionResults": {}, "response": {
                               "clientDataJSON": b64(self._client_data("webauthn.create", challenge, rp)),
                               "attestationObject": b64(attestation), "transports": ["internal"]}})

    def get(self, rp: RelyingParty, challenge: str) -> str:
        auth_data = hashlib.sha256(rp.id.encode()).digest() + bytes([0x05]) + bytes(4)  # UP, UV, count 0
        client_data = self._client_data("webauthn.get", challenge, rp)
        signature = self.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return json.dumps({"id": b64(self.credential_id), "rawId": b64(self.credential_id), "type": "public-key",
                           "clientExtensionResults": {}, "response": {
                               "clientDataJSON": b64(client_data), "authenticatorData": b64(auth_data),
                               "signature": b64(signature), "userHandle": self.handle}})


class _PasskeyForms(HTMLParser):
    """The page's passkey forms (data-passkey="create" or "get"): their options and fields."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict, dict[str, str]]] = []
        self._in: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        named = dict(attrs)
        if tag == "form":
            self._in = {} if named.get("data-passkey") else None
            if self._in is not None:
                self.forms.append((named["action"], json.loads(html.unescape(named["data-options"])), self._in))
        elif tag == "input" and self._in is not None and named.get("name"):
            self._in[named["name"]] = named.get("value") or ""


def passkey_form(page: bytes) -> tuple[str, dict, dict[str, str]]:
    parser = _PasskeyForms()
    parser.feed(page.decode())
    assert parser.forms, page[:500]
    return parser.forms[0]


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    """The tree on an issuer with a host name (an IP address has no passkeys), alice and bob in it."""
    config = configuration.Config()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, issuer=RP.origin))
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        for name in ("alice", "bob"):
            store.add_user(name, None, cheap_password_hash(PASSWORD))
    with Bridge.over(store, config) as bridge:
        yield bridge


def signed_in(bridge: Bridge, username: str) -> Http:
    browser = bridge.browser()
    action, fields = form_of(browser.get("/account"))
    assert browser.post(action, data={**fields, "username": username, "password": PASSWORD}).code == 303
    return browser


def register(browser: Http, key: SoftAuthenticator) -> bytes:
    """Add `key` on /account/passkeys; the page that comes back."""
    action, options, fields = passkey_form(browser.get("/account/passkeys").body)
    credential = key.create(RP, options["challenge"], options["user"]["id"])
    return browser.post(action, data={**fields, "credential": credential}).body


def passkeys_of(bridge: Bridge, username: str) -> list[str]:
    with bridge.store.transaction():
        return [k.credential_id for k in bridge.store.passkeys(bridge.store.get_user_by_name(username).id)]


def test_a_refused_answer_spends_nothing_and_an_accepted_one_is_not_accepted_again(bridge):
    alice, key = signed_in(bridge, "alice"), SoftAuthenticator()
    action, options, fields = passkey_form(alice.get("/account/passkeys").body)
    for wrong in ("", "{}", key.create(RP, b64(b"another challenge"), options["user"]["id"])):
        assert alice.post(action, data={**fields, "credential": wrong}).code == 400
    answer = key.create(RP, options["challenge"], options["user"]["id"])
    assert alice.post(action, data={**fields, "credential": answer}).code == 200
    assert passkeys_of(bridge, "alice") == [b64(key.credential_id)]
    with bridge.store.transaction():
        bridge.store.remove_passkeys(bridge.store.get_user_by_name("alice").id, [b64(key.credential_id)])
    again = alice.post(action, data={**fields, "credential": answer})
    assert again.code == 400 and passkeys_of(bridge, "alice") == []
    assert bridge.audit.of("passkey_refused")[-1]["detail"].startswith("challenge used already")


def test_one_users_flood_of_answers_refuses_only_that_user(bridge):
    """A signed-in user who opens the page many times and posts answers as fast as a script
    makes them (made-up ones, then ones that verify) fills only their own memory: bob still
    adds a passkey and signs in with it."""
    alice, per_user = signed_in(bridge, "alice"), passkeys.SPENT_PER_USER
    forms = [passkey_form(alice.get("/account/passkeys").body) for _ in range(2 * per_user + 1)]
    for action, _, fields in forms[:per_user]:  # refused by the library: nothing spent
        assert alice.post(action, data={**fields, "credential": '{"id": "AA"}'}).code == 400
    for action, options, fields in forms[per_user:]:
        made = SoftAuthenticator().create(RP, options["challenge"], options["user"]["id"])
        alice.post(action, data={**fields, "credential": made})
    assert len(passkeys_of(bridge, "alice")) == passkeys.MAX_PASSKEYS  # the others verified but were not kept
    refused = [e["detail"] for e in bridge.audit.of("passkey_refused")]
    assert len(refused) == per_user + 1 and refused[-1] == "challenge used already, or too many at once"

    bob, key = signed_in(bridge, "bob"), SoftAuthenticator()
    register(bob, key)
    assert passkeys_of(bridge, "bob") == [b64(key.credential_id)]
    stranger = bridge.browser()
    action, options, fields = passkey_form(stranger.get("/account").body)
    answer = key.get(RP, options["challenge"])
    assert stranger.post(action, data={**fields, "credential": answer}).code == 303
    assert [e["user"] for e in bridge.audit.of("sign_in")][-1] == "bob"


def test_a_sign_in_answer_posted_twice_signs_in_once(bridge):
    bob, key = signed_in(bridge, "bob"), SoftAuthenticator()
    register(bob, key)
    stranger = bridge.browser()
    action, options, fields = passkey_form(stranger.get("/account").body)
    answer = key.get(RP, options["challenge"])
    assert stranger.post(action, data={**fields, "credential": answer}).code == 303
    replayed = stranger.post(action, data={**fields, "credential": answer})
    assert replayed.code == 401, replayed.code
    failed = bridge.audit.of("sign_in_failed")[-1]
    assert failed["reason"] == "passkey" and failed["detail"].startswith("challenge used already")


def test_a_credential_id_longer_than_the_table_keeps_is_refused_on_the_page(bridge):
    alice = signed_in(bridge, "alice")
    page = register(alice, SoftAuthenticator(secrets.token_bytes(1000)))
    assert "The passkey was not added" in page.decode() and passkeys_of(bridge, "alice") == []
    assert "credential id of 1000 bytes" in bridge.audit.of("passkey_refused")[-1]["detail"]

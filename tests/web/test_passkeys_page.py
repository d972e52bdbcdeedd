"""/account/passkeys in process, over the whole HTTP tree and a real SQLite store: removing a
passkey asks for the password (or a current code from the authenticator app), as turning TOTP
off does, so that a session left open is not enough to undo a second factor. Adding one takes a
real authenticator: tests/test_browser_passkeys.py."""

from __future__ import annotations

import dataclasses
import json
import time

import pyotp
import pytest

from bearerbridge import config as configuration
from bearerbridge import otp
from bearerbridge.passkeys import NewPasskey

from ..fakes import Answer, Bridge, Http, cheap_password_hash, form_of, sqlite_store
from ..support import form_fields
from ..test_passkeys import RP

PASSWORD = "correct horse battery"
PAGE = "/account/passkeys"


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
        store.add_user("bob", None, cheap_password_hash(PASSWORD))
    yield Bridge.over(store, configuration.Config())
    store.engine.dispose()


def with_a_passkey(bridge: Bridge, username: str) -> tuple[Http, int]:
    """A browser signed in as `username`, who then adds a passkey ("cred-<username>"): added in the
    store, as a real authenticator's is in tests/test_browser_passkeys.py."""
    browser = bridge.browser()
    action, fields = form_of(browser.get("/account"))
    assert browser.post(action, data={**fields, "username": username, "password": PASSWORD}).code == 303
    with bridge.store.transaction():
        user = bridge.store.get_user_by_name(username)
        bridge.store.add_passkey(user.id, f"handle-{username}", NewPasskey(f"cred-{username}", "key", 0, "internal"),
                                 "Laptop")
    return browser, user.id


def remove(browser: Http, credential_id: str, proof: str | None) -> Answer:
    """Post the page's Remove form for `credential_id`, with `proof` typed (None: the field left out)."""
    page = browser.get(PAGE).body.decode()
    action, fields = next(form_fields("<form" + part) for part in page.split("<form")[1:] if 'value="remove"' in part)
    fields["credential_id"] = credential_id
    fields.pop("proof", None)
    if proof is not None:
        fields["proof"] = proof
    return browser.post(action, data=fields)


def passkeys_of(bridge: Bridge, user_id: int) -> list[str]:
    with bridge.store.transaction():
        return [key.credential_id for key in bridge.store.passkeys(user_id)]


def test_removing_a_passkey_asks_for_the_password(bridge):
    browser, alice = with_a_passkey(bridge, "alice")
    for proof in (None, "", "not the password"):
        refused = remove(browser, "cred-alice", proof)
        assert refused.code == 400, refused.body[:300]
        assert passkeys_of(bridge, alice) == ["cred-alice"]
    assert "That password is wrong." in refused.body.decode()
    assert not bridge.audit.of("passkey_removed")

    removed = remove(browser, "cred-alice", PASSWORD)
    assert removed.code == 200 and "Passkey “Laptop” removed" in removed.body.decode()
    assert passkeys_of(bridge, alice) == []
    assert bridge.audit.of("passkey_removed") == [{"user": "alice", "address": "127.0.0.1", "name": "Laptop"}]


def test_a_current_code_from_the_app_proves_it_too_but_not_a_spent_one(bridge):
    browser, alice = with_a_passkey(bridge, "alice")
    secret = pyotp.random_base32()
    with bridge.store.transaction():
        assert bridge.store.begin_totp(alice, secret)
    code = pyotp.TOTP(secret).now()
    with bridge.store.transaction():
        assert bridge.store.confirm_totp(alice, code, otp.new_recovery_codes())
    # The code that turned TOTP on is spent: it proves nothing again.
    assert remove(browser, "cred-alice", code).code == 400
    assert passkeys_of(bridge, alice) == ["cred-alice"]
    # The next step's code is accepted (one step either way is), once.
    assert remove(browser, "cred-alice", pyotp.TOTP(secret).at(time.time() + 30)).code == 200
    assert passkeys_of(bridge, alice) == []


def test_another_users_passkey_is_not_yours_to_remove(bridge):
    browser, alice = with_a_passkey(bridge, "alice")
    _, bob = with_a_passkey(bridge, "bob")
    refused = remove(browser, "cred-bob", PASSWORD)
    assert refused.code == 404 and "not one of yours" in refused.body.decode()
    assert not bridge.audit.of("passkey_removed")
    assert passkeys_of(bridge, bob) == ["cred-bob"] and passkeys_of(bridge, alice) == ["cred-alice"]


@pytest.mark.parametrize("page", ["/account", "/admin"])
def test_a_refused_passkey_says_so_not_wrong_password(tmp_path, page):
    store = sqlite_store(tmp_path / "rp.db")
    with store.transaction():
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
    config = configuration.Config()
    bridge = Bridge.over(store, dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                                        issuer=RP.origin)))
    browser = bridge.browser()
    shown = browser.get(page)
    action, fields = form_of(shown)
    [passkey_form] = [form_fields("<form" + part)[1] for part in shown.body.decode().split("<form")[1:]
                      if 'data-passkey="get"' in part]
    made_up = json.dumps({"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {
        "clientDataJSON": "e30", "authenticatorData": "AAAA", "signature": "AAAA", "userHandle": "AAAA"}})
    refused = browser.post(action, data={**passkey_form, "credential": made_up})
    assert refused.code == 401 and 'id="passkey-refused"' in refused.body.decode()
    [failed] = bridge.audit.of("sign_in_failed")
    assert failed["reason"] == "passkey" and failed["detail"] == "unknown passkey"
    assert "Wrong username or password" not in refused.body.decode()
    wrong = browser.post(action, data={**fields, "username": "alice", "password": "not it"})
    assert wrong.code == 401 and "Wrong username or password" in wrong.body.decode()

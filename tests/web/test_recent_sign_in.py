"""The pages that add ways in (/account/app-passwords, /account/passkeys, /account/two-factor)
ask a sign-in older than RECENT_SIGN_IN to confirm it is the user first, in process over the
whole HTTP tree and a real SQLite store; taking a way in away does not ask. And with `[server]
require_second_factor`, no app password comes from a password-only sign-in."""

from __future__ import annotations

import time

import pyotp
import pytest
import sqlalchemy as sa

from bearerbridge import config as configuration
from bearerbridge import otp
from bearerbridge.storage.schema import sessions
from bearerbridge.throttle import ThrottleRules
from bearerbridge.web.account import RECENT_SIGN_IN

from ..fakes import Answer, Bridge, Http, cheap_password_hash, form_of, sqlite_store

PASSWORD = "correct horse battery"
CONFIG = configuration.Config(sasl=configuration.SaslSettings(plain=("smtp",)))
PAGES = ("/account/app-passwords", "/account/passkeys", "/account/two-factor")


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
    yield Bridge.over(store, CONFIG)
    store.engine.dispose()


def signed_in(bridge: Bridge) -> Http:
    browser = bridge.browser()
    action, fields = form_of(browser.get("/account"))
    assert browser.post(action, data={**fields, "username": "alice", "password": PASSWORD}).code == 303
    return browser


def age_sessions(bridge: Bridge, seconds: int) -> None:
    """Move every session's sign-in `seconds` into the past."""
    with bridge.store.transaction():
        bridge.store._db.execute(sessions.update().values(created_at=sessions.c.created_at - seconds))


def session_count(bridge: Bridge) -> int:
    with bridge.store.transaction():
        return bridge.store._db.execute(sa.select(sa.func.count()).select_from(sessions)).scalar()


def session_digests(bridge: Bridge) -> set[str]:
    with bridge.store.transaction():
        return set(bridge.store._db.execute(sa.select(sessions.c.id_digest)).scalars())


def make_app_password(browser: Http, csrf: str) -> Answer:
    return browser.post("/account/app-passwords", data={"csrf": csrf, "step": "create", "name": "Printer",
                                                        "expiry": "30", "service:smtp": "on"})


def confirm(browser: Http, page: str, proof: str) -> Answer:
    action, fields = form_of(browser.get(page))
    assert fields["step"] == "confirm_identity"
    return browser.post(action, data={**fields, "proof": proof})


@pytest.mark.parametrize("page", PAGES)
def test_a_fresh_sign_in_sees_the_page_an_old_one_confirms_first(bridge, page):
    browser = signed_in(bridge)
    fresh = browser.get(page)
    assert fresh.code == 200 and 'name="step" value="confirm_identity"' not in fresh.body.decode()
    assert 'id="back"' in fresh.body.decode()  # the page itself, not a way back to /account
    age_sessions(bridge, RECENT_SIGN_IN + 1)
    asked = browser.get(page)
    assert asked.code == 200 and 'id="confirm-identity"' in asked.body.decode()


def test_an_old_sign_in_cannot_make_an_app_password_until_it_confirms(bridge):
    browser = signed_in(bridge)
    csrf = form_of(browser.get("/account"))[1]["csrf"]
    age_sessions(bridge, RECENT_SIGN_IN + 1)
    refused = make_app_password(browser, csrf)
    assert refused.code == 403 and "confirm it is you" in refused.body.decode()
    with bridge.store.transaction():
        assert bridge.store.app_passwords(1) == []

    for wrong in ("", "not the password", "123456"):
        assert confirm(browser, "/account/app-passwords", wrong).code == 400
    assert session_count(bridge) == 1
    before = session_digests(bridge)
    confirmed = confirm(browser, "/account/app-passwords", PASSWORD)
    assert confirmed.code == 303 and confirmed.header("Location") == "/account/app-passwords"
    after = session_digests(bridge)
    assert len(after) == 1 and not after & before  # a new session in place of the old one
    assert [e["page"] for e in bridge.audit.of("identity_confirmed")] == ["/account/app-passwords"]
    assert "confirm_identity" not in browser.get("/account/app-passwords").body.decode()
    made = make_app_password(browser, form_of(browser.get("/account"))[1]["csrf"])
    assert made.code == 200 and 'id="secret"' in made.body.decode()


def test_a_code_from_the_app_confirms_too(bridge):
    browser = signed_in(bridge)
    secret = pyotp.random_base32()
    with bridge.store.transaction():
        assert bridge.store.begin_totp(1, secret)
    age_sessions(bridge, RECENT_SIGN_IN + 1)
    # Not on yet: a code of a secret still waiting for its first code proves nothing.
    assert confirm(browser, "/account/passkeys", pyotp.TOTP(secret).now()).code == 400
    with bridge.store.transaction():
        assert bridge.store.confirm_totp(1, pyotp.TOTP(secret).now(), otp.new_recovery_codes())
    assert confirm(browser, "/account/passkeys", pyotp.TOTP(secret).at(time.time() + 30)).code == 303


def test_revoking_from_an_old_sign_in_asks_nothing(bridge):
    browser = signed_in(bridge)
    made = make_app_password(browser, form_of(browser.get("/account"))[1]["csrf"])
    assert made.code == 200
    age_sessions(bridge, RECENT_SIGN_IN + 1)
    account = browser.get("/account").body.decode()
    csrf = form_of(browser.get("/account"))[1]["csrf"]
    [app_id] = [p.password.id for p in _listed(bridge)]
    assert f'id="revoke-app-password-{app_id}"' in account
    revoked = browser.post("/account/app-passwords", data={"csrf": csrf, "step": "revoke", "id": str(app_id)})
    assert revoked.code == 200 and "revoked" in revoked.body.decode()
    assert _listed(bridge) == []


def _listed(bridge: Bridge):
    with bridge.store.transaction():
        return bridge.store.app_passwords(1)


@pytest.mark.parametrize("rule, admin, refused", [
    ("everyone", False, True),
    ("admins", True, True),
    ("admins", False, False),  # the rule is not alice's: her password alone makes one
])
def test_with_a_second_factor_required_a_password_only_sign_in_makes_no_app_password(tmp_path, rule, admin, refused):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_user("root", None, None, is_admin=True)
        alice = store.add_user("alice", None, cheap_password_hash(PASSWORD), is_admin=admin)
    config = configuration.Config(sasl=configuration.SaslSettings(plain=("smtp",)),
                                  server=configuration.ServerSettings(require_second_factor=rule))
    bridge = Bridge.over(store, config)
    browser = signed_in(bridge)
    answer = make_app_password(browser, form_of(browser.get("/account"))[1]["csrf"])
    said = "second factor before you make app passwords" in answer.body.decode()
    assert (answer.code, said) == ((403, True) if refused else (200, False))
    with store.transaction():
        assert len(store.app_passwords(alice.id)) == (0 if refused else 1)
    store.engine.dispose()


def test_guesses_at_the_users_name_elsewhere_do_not_stop_their_own_browser_confirming(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_user("alice", None, cheap_password_hash(PASSWORD))
    # As in test_throttle: no delay before the fifth failure; the account blocked at 5, the address at 8.
    rules = ThrottleRules(free_failures=4, first_delay=1.0, max_delay=4.0, account_block_after=5,
                          address_block_after=8, block=300, forget_after=900)
    bridge = Bridge.over(store, configuration.Config(throttle=configuration.ThrottleSettings(sign_in=rules)))
    own = signed_in(bridge)
    age_sessions(bridge, RECENT_SIGN_IN + 1)
    attacker = bridge.browser()
    for _ in range(5):
        action, fields = form_of(attacker.get("/account"))
        attacker.pending("POST", action, data={**fields, "username": "alice", "password": "guess"})
        bridge.clock.advance(4)
        attacker.flush()
    action, fields = form_of(attacker.get("/account"))
    assert attacker.post(action, data={**fields, "username": "alice", "password": PASSWORD}).code == 429
    assert confirm(own, "/account/passkeys", PASSWORD).code == 303
    store.engine.dispose()

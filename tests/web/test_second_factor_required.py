"""`[server] require_second_factor`: who must have signed in with a second factor before approving
an app or a device, or using /admin; one who has none set up is sent to set one up, and a code set
up counts for the session it was set up in."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from bearerbridge import config as configuration
from bearerbridge.config import ConfigError, parse
from bearerbridge.storage.models import SECOND_FACTORS, SignIn, User

from ..fakes import Bridge, NewUser, form_of, redirect_params, sqlite_bridge
from ..support import authorize_url, pkce_pair
from .test_two_factor import (
    ALICE,
    CB,
    CLIENTS,
    account_browser,
    codes_of,
    enrol,
    password_at_authorize,
    password_on,
    second_step,
)


def bridge_requiring(tmp_path, rule: str) -> Bridge:
    """test_two_factor's clients, alice and an admin, root, under `require_second_factor = rule`."""
    config = configuration.Config()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, require_second_factor=rule))
    return sqlite_bridge(tmp_path / "x.db", CLIENTS, [ALICE, NewUser("root", is_admin=True)], config)


@pytest.fixture
def everyone(tmp_path) -> Iterator[Bridge]:
    with bridge_requiring(tmp_path, "everyone") as bridge:
        yield bridge


def test_the_rule_reads_the_sign_ins_methods():
    alice, root = User(1, "alice", None), User(2, "root", None, is_admin=True)
    assert not SignIn(alice, 0, ("pwd",)).lacks_second_factor("none")
    assert not SignIn(alice, 0, ("pwd",)).lacks_second_factor("admins")
    assert SignIn(root, 0, ("pwd",)).lacks_second_factor("admins")
    assert SignIn(alice, 0, ("pwd",)).lacks_second_factor("everyone")
    for method in SECOND_FACTORS:
        assert not SignIn(alice, 0, ("pwd", method)).lacks_second_factor("everyone")
    with pytest.raises(ConfigError, match=r"\[server\] require_second_factor: 'always' is not one of"):
        parse({"server": {"require_second_factor": "always"}})


def test_a_password_alone_gets_no_consent_but_the_way_to_set_up_a_second_factor(everyone):
    browser = everyone.browser()
    _, page = password_at_authorize(everyone, browser)
    assert page.code == 403 and 'id="second-factor-required"' in page.body.decode()
    assert 'href="/account/two-factor"' in page.body.decode() and "Relying Party" in page.body.decode()
    _, challenge = pkce_pair()
    silent = redirect_params(browser.get(authorize_url("", "rp", CB, challenge, "imap", prompt="none")))
    assert silent["error"] == "interaction_required" and silent["state"] == "st-123"
    assert browser.get("/account").code == 200  # where to set one up stays open


def test_a_code_set_up_counts_for_its_session_and_a_code_at_sign_in_for_the_next(everyone):
    browser = account_browser(everyone)
    secret, _ = enrol(everyone, browser)
    _, challenge = pkce_pair()
    page = browser.get(authorize_url("", "rp", CB, challenge, "imap"))
    assert page.code == 200 and form_of(page)[1]["step"] == "consent"
    fresh = everyone.browser()
    _, asked = password_at_authorize(everyone, fresh)
    after = second_step(fresh, asked, code=codes_of(secret)[0])
    assert after.code == 200 and form_of(after)[1]["step"] == "consent"


def test_the_device_page_asks_for_a_second_factor_before_the_code(everyone):
    browser = account_browser(everyone)
    page = browser.get("/device")
    assert page.code == 403 and 'id="second-factor-required"' in page.body.decode()
    assert browser.post("/device", data={"step": "code", "user_code": "BCDF-GHJK"}).code == 403


def test_admins_only_spares_other_users_and_holds_admins_at_admin(tmp_path):
    bridge = bridge_requiring(tmp_path, "admins")
    _, page = password_at_authorize(bridge, bridge.browser())
    assert page.code == 200 and form_of(page)[1]["step"] == "consent"  # alice is no admin
    admin = bridge.browser()
    assert password_on(admin, "/admin", "root").code in (302, 303)
    held = admin.get("/admin")
    assert held.code == 403 and 'id="second-factor-required"' in held.body.decode()
    bridge.store.engine.dispose()

"""/account's Revoke ending a grant's live mail sessions at Dovecot, and /account/app-passwords'
ending an app password's, in process: the whole HTTP tree over a real SQLite store, asking a fake
doveadm HTTP API on loopback (tests/doveadm/fake.py). Whatever Dovecot answers, or if it does not,
the revocation stands; the page says what became of the live sessions, and the audit log records
it (web/mail_kick.py). An admin disabling a user: tests/web/test_admin.py. The real Dovecot:
tests/test_peers_revoke.py."""

from __future__ import annotations

import html
import time
from collections.abc import Iterable

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from bearerbridge.config import Config, DovecotSettings, SaslSettings
from bearerbridge.storage.apppasswords import family_of
from bearerbridge.storage.schema import token_uses

from ..doveadm.fake import KEY
from ..fakes import Answer, Bridge, Http, NewUser, form_of, sqlite_bridge
from ..support import free_port
from .test_account import ALICE, CLIENTS, active, granted, signed_in_browser
from .test_app_passwords import make as make_app_password

TIMEOUT = 0.5  # seconds: [dovecot] timeout here
SASL = SaslSettings(plain=("smtp", "imap"))  # app passwords may be made for smtp and imap


def bridge_over(tmp_path, url: str, key: bytes = KEY, users: Iterable[NewUser] = (ALICE,)) -> Bridge:
    """/account's clients and alice (or `users`), with [dovecot] asking the doveadm API at `url`
    with `key`, and app passwords for smtp and imap (PLAIN)."""
    key_file = tmp_path / "doveadm.key"
    key_file.write_bytes(key + b"\n")
    dovecot = DovecotSettings(doveadm_url=url, doveadm_key_file=str(key_file), timeout=TIMEOUT)
    return sqlite_bridge(tmp_path / "x.db", CLIENTS, users, Config(dovecot=dovecot, sasl=SASL))


# How a kick fails: a case, Kicked.outcome and its reason. `failing_bridge` sets each up.
DOVECOT_FAILURES = pytest.mark.parametrize("case, outcome, reason", [
    ("wrong key", "refused", "HTTP 401: Dovecot refused the API key (doveadm_key_file)"),
    ("silent", "unreachable", f"no answer within {TIMEOUT} s"),
    ("nobody listening", "unreachable", "cannot connect: ConnectionRefusedError"),
    ("usage error", "failed", "kick: exitCode, exit code 64 (usage error)"),
])


def failing_bridge(tmp_path, doveadm, case: str, users: Iterable[NewUser] = (ALICE,)) -> Bridge:
    """`bridge_over` a doveadm API that fails as DOVECOT_FAILURES's `case` says."""
    url = f"http://127.0.0.1:{free_port()}/doveadm/v1" if case == "nobody listening" else doveadm.url
    doveadm.mode = {"silent": "silent", "usage error": "usage"}.get(case, "kick")
    return bridge_over(tmp_path, url, b"wrong-key" if case == "wrong key" else KEY, users)


@pytest.fixture
def bridge(tmp_path, doveadm):  # doveadm: tests/conftest.py's fake doveadm HTTP API
    with bridge_over(tmp_path, doveadm.url) as made:
        yield made


def used_from(bridge: Bridge, access_token: str, **addresses: str | None) -> None:
    """Record the grant's last use at each service, as the use recorder writes it."""
    with bridge.store.transaction():
        family = bridge.store.find_access_token(access_token).family
    family_used_from(bridge, family, **addresses)


def family_used_from(bridge: Bridge, family: str, **addresses: str | None) -> None:
    """Record the last use of a token family (a grant's, `app:<id>` an app password's) at each service."""
    with bridge.store.transaction():
        bridge.store._db.execute(token_uses.insert(), [
            {"family": family, "service": service, "last_used_at": 1_767_225_600, "address": address}
            for service, address in addresses.items()])


async def revoke(browser: Http, client_id: str) -> Answer:
    """POST the Revoke form; the page, once Dovecot has answered (or the timeout passed)."""
    _, form = form_of(browser.get("/account"))
    return await answered(browser, "/account", {"csrf": form["csrf"], "step": "revoke", "client_id": client_id})


async def answered(browser: Http, path: str, data: dict[str, str]) -> Answer:
    """POST `data` to `path`; the answer, once Dovecot has answered (or the timeout passed): the
    fake doveadm API answers on the reactor, which runs while this waits."""
    answers = browser.pending("POST", path, data=data)
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.01)
        browser.flush()
    assert answers, "no answer within 5 s"
    return answers[0]


def notice(answer: Answer) -> str:
    assert answer.code == 200, answer.body
    page = answer.body.decode()
    start = page.index('id="notice"')
    return html.unescape(page[page.index(">", start) + 1:page.index("</", start)]).strip()


@pytest_twisted.ensureDeferred
async def test_revoking_ends_the_sessions_from_where_the_grant_was_last_used(bridge, doveadm):
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap smtp")
    used_from(bridge, tokens["access_token"], imap="192.0.2.7", smtp="198.51.100.1")
    doveadm.sessions = 2
    said = notice(await revoke(browser, "mail"))
    assert said.startswith("Access revoked: the app's tokens no longer work")
    assert said.endswith("Ended 2 live mail session(s) open from where it was last used.")
    assert not active(bridge, tokens["access_token"])
    [seen] = doveadm.seen
    assert seen.commands[1] == ["kick", {"mask": ["alice", "192.0.2.7/32"]}, "kick0"]  # smtp is not Dovecot's
    [revoked] = bridge.audit.of("grant_revoked")
    [kick] = bridge.audit.of("mail_kick")
    assert revoked["client_id"] == "mail"
    assert {k: kick[k] for k in ("user", "client_id", "mail_user", "networks", "outcome", "ended")} == {
        "user": "alice", "client_id": "mail", "mail_user": "alice", "networks": ["192.0.2.7/32"],
        "outcome": "ended", "ended": 2}


@pytest_twisted.ensureDeferred
async def test_a_grant_never_seen_at_dovecot_ends_every_session_of_the_user(bridge, doveadm):
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap")
    said = notice(await revoke(browser, "mail"))
    assert said.endswith("Ended 1 live mail session(s) of yours; your other mail apps reconnect by themselves.")
    assert doveadm.seen[0].commands[1] == ["kick", {"mask": ["alice"]}, "kick0"]
    assert not active(bridge, tokens["access_token"])
    [kick] = bridge.audit.of("mail_kick")
    assert "networks" not in kick and kick["outcome"] == "ended"


@pytest_twisted.ensureDeferred
async def test_no_live_session_is_said_and_audited(bridge, doveadm):
    doveadm.mode = "none"
    browser = signed_in_browser(bridge)
    granted(bridge, browser, "mail", "imap")
    assert notice(await revoke(browser, "mail")).endswith("It had no mail session open.")
    [kick] = bridge.audit.of("mail_kick")
    assert (kick["outcome"], kick["ended"]) == ("none_open", 0)


UNREACHED = ("The mail server could not be reached to end live sessions: a mail app already connected stays "
             "connected until it disconnects, and cannot log in again.")


def not_ended(outcome: str) -> str:
    """What the page says when a kick had `outcome` (one of DOVECOT_FAILURES's)."""
    return UNREACHED if outcome != "failed" else UNREACHED.replace("could not be reached", "failed")


@DOVECOT_FAILURES
@pytest_twisted.ensureDeferred
async def test_a_dovecot_that_cannot_be_reached_leaves_the_revocation_done_and_says_so(tmp_path, doveadm, case,
                                                                                         outcome, reason):
    bridge = failing_bridge(tmp_path, doveadm, case)
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap")
    started = time.monotonic()
    answer = await revoke(browser, "mail")
    assert time.monotonic() - started < TIMEOUT + 1
    assert notice(answer).endswith(not_ended(outcome))
    assert not active(bridge, tokens["access_token"])
    assert 'id="app-mail"' not in answer.body.decode()
    [kick] = bridge.audit.of("mail_kick")
    assert (kick["outcome"], kick["reason"], kick["ended"]) == (outcome, reason, 0)
    assert bridge.audit.of("grant_revoked")
    bridge.store.engine.dispose()


@pytest_twisted.ensureDeferred
async def test_a_grant_that_could_not_open_a_mail_session_asks_dovecot_nothing(bridge, doveadm):
    browser = signed_in_browser(bridge)
    granted(bridge, browser, "chat", "xmpp")
    said = notice(await revoke(browser, "chat"))
    assert said == "Access revoked: the app's tokens no longer work, and it must ask you again before it gets any."
    assert doveadm.seen == [] and bridge.audit.of("mail_kick") == []


# -- an app password's Revoke (/account/app-passwords) ------------------------------------------

async def revoke_app_password(browser: Http, app_id: int) -> Answer:
    """POST an app password's Revoke button (as /account shows it); the page, once Dovecot has
    answered (or the timeout passed)."""
    _, form = form_of(browser.get("/account"))
    return await answered(browser, "/account/app-passwords", {"csrf": form["csrf"], "step": "revoke",
                                                               "id": str(app_id)})


def live_app_passwords(bridge: Bridge) -> list[str]:
    with bridge.store.transaction():
        return [item.password.name for item in bridge.store.app_passwords(bridge.store.get_user_by_name("alice").id)]


@pytest_twisted.ensureDeferred
async def test_revoking_an_app_password_used_at_imap_ends_the_sessions_from_where_it_was_used_there(bridge, doveadm):
    browser = signed_in_browser(bridge)
    app_id, _ = make_app_password(browser, "Thunderbird", ("imap", "smtp"))
    family_used_from(bridge, family_of(app_id), imap="192.0.2.7", smtp="198.51.100.1")
    doveadm.sessions = 2
    said = notice(await revoke_app_password(browser, app_id))
    assert said == ("App password “Thunderbird” revoked: it no longer opens anything. Ended 2 live mail "
                    "session(s) open from where it was last used.")
    assert live_app_passwords(bridge) == []
    [seen] = doveadm.seen
    assert seen.commands == [["who", {"mask": ["alice", "192.0.2.7/32"], "separate-connections": True}, "who0"],
                             ["kick", {"mask": ["alice", "192.0.2.7/32"]}, "kick0"]]  # smtp is Postfix's
    [revoked] = bridge.audit.of("app_password_revoked")
    [kick] = bridge.audit.of("mail_kick")
    assert revoked["family"] == f"app:{app_id}"
    assert kick == {"user": "alice", "family": f"app:{app_id}", "address": "127.0.0.1", "by": "user",
                    "mail_user": "alice", "networks": ["192.0.2.7/32"], "outcome": "ended", "ended": 2}


@pytest_twisted.ensureDeferred
async def test_an_app_password_for_imap_never_used_there_ends_every_session_of_the_user(bridge, doveadm):
    browser = signed_in_browser(bridge)
    app_id, _ = make_app_password(browser, "Phone", ("imap", "smtp"))
    family_used_from(bridge, family_of(app_id), smtp="198.51.100.1")  # it may have logged in at imap just now
    said = notice(await revoke_app_password(browser, app_id))
    assert said.endswith("revoked: it no longer opens anything. Ended 1 live mail session(s) of yours; your other "
                         "mail apps reconnect by themselves.")
    assert doveadm.seen[0].commands[1] == ["kick", {"mask": ["alice"]}, "kick0"]
    [kick] = bridge.audit.of("mail_kick")
    assert "networks" not in kick and (kick["family"], kick["outcome"]) == (f"app:{app_id}", "ended")


@pytest_twisted.ensureDeferred
async def test_an_app_password_made_only_for_smtp_and_never_used_at_imap_asks_dovecot_nothing(bridge, doveadm):
    browser = signed_in_browser(bridge)
    app_id, _ = make_app_password(browser, "Relay", ("smtp",))
    family_used_from(bridge, family_of(app_id), smtp="198.51.100.1")
    said = notice(await revoke_app_password(browser, app_id))
    assert said == "App password “Relay” revoked: it no longer opens anything."
    assert doveadm.seen == [] and bridge.audit.of("mail_kick") == []
    assert live_app_passwords(bridge) == [] and bridge.audit.of("app_password_revoked")


@pytest_twisted.ensureDeferred
async def test_an_app_password_revoked_already_asks_dovecot_nothing_again(bridge, doveadm):
    browser = signed_in_browser(bridge)
    app_id, _ = make_app_password(browser, "Thunderbird", ("imap",))
    doveadm.mode = "none"
    assert notice(await revoke_app_password(browser, app_id)).endswith("It had no mail session open.")
    again = await revoke_app_password(browser, app_id)
    assert again.code == 400 and "revoked already" in again.body.decode()
    assert len(doveadm.seen) == 1 and len(bridge.audit.of("mail_kick")) == 1
    assert bridge.audit.of("mail_kick")[0]["outcome"] == "none_open"


@DOVECOT_FAILURES
@pytest_twisted.ensureDeferred
async def test_an_app_password_revoked_when_dovecot_cannot_end_its_sessions_stays_revoked_and_says_so(
        tmp_path, doveadm, case, outcome, reason):
    with failing_bridge(tmp_path, doveadm, case) as bridge:
        browser = signed_in_browser(bridge)
        app_id, _ = make_app_password(browser, "Thunderbird", ("imap",))
        family_used_from(bridge, family_of(app_id), imap="192.0.2.7")
        started = time.monotonic()
        answer = await revoke_app_password(browser, app_id)
        assert time.monotonic() - started < TIMEOUT + 1
        said = notice(answer)
        assert said.startswith("App password “Thunderbird” revoked: it no longer opens anything. The mail server ")
        assert said.endswith(not_ended(outcome))
        assert live_app_passwords(bridge) == [] and f'id="app-password-{app_id}"' not in answer.body.decode()
        [kick] = bridge.audit.of("mail_kick")
        assert (kick["outcome"], kick["reason"], kick["ended"], kick["networks"]) == (outcome, reason, 0,
                                                                                      ["192.0.2.7/32"])
        assert bridge.audit.of("app_password_revoked")

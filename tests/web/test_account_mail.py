"""/account's Revoke ending the grant's live mail sessions at Dovecot, in process: the whole HTTP
tree over a real SQLite store, asking a fake doveadm HTTP API on loopback (tests/doveadm/fake.py).
Whatever Dovecot answers, or if it does not, the revocation stands; the page says what became of
the live sessions, and the audit log records it. The real Dovecot: tests/test_peers_revoke.py."""

from __future__ import annotations

import dataclasses
import html
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from bearerbridge.config import Config, DovecotSettings
from bearerbridge.storage.schema import token_uses

from ..doveadm.fake import KEY
from ..fakes import Answer, Bridge, Http, form_of, sqlite_bridge
from ..support import free_port
from .test_account import ALICE, CLIENTS, active, granted, signed_in_browser

TIMEOUT = 0.5  # seconds: [dovecot] timeout here


def bridge_over(tmp_path, url: str, key: bytes = KEY) -> Bridge:
    """/account's clients and alice, with [dovecot] asking the doveadm API at `url` with `key`."""
    key_file = tmp_path / "doveadm.key"
    key_file.write_bytes(key + b"\n")
    dovecot = DovecotSettings(doveadm_url=url, doveadm_key_file=str(key_file), timeout=TIMEOUT)
    return sqlite_bridge(tmp_path / "x.db", CLIENTS, [ALICE], dataclasses.replace(Config(), dovecot=dovecot))


@pytest.fixture
def bridge(tmp_path, doveadm):  # doveadm: tests/conftest.py's fake doveadm HTTP API
    with bridge_over(tmp_path, doveadm.url) as made:
        yield made


def used_from(bridge: Bridge, access_token: str, **addresses: str | None) -> None:
    """Record the grant's last use at each service, as the use recorder writes it."""
    with bridge.store.transaction():
        family = bridge.store.find_access_token(access_token).family
        bridge.store._db.execute(token_uses.insert(), [
            {"family": family, "service": service, "last_used_at": 1_767_225_600, "address": address}
            for service, address in addresses.items()])


async def revoke(browser: Http, client_id: str) -> Answer:
    """POST the Revoke form; the page, once Dovecot has answered (or the timeout passed)."""
    _, form = form_of(browser.get("/account"))
    answers = browser.pending("POST", "/account", data={"csrf": form["csrf"], "step": "revoke",
                                                        "client_id": client_id})
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


@pytest.mark.parametrize("case, outcome, reason", [
    ("wrong key", "refused", "HTTP 401: Dovecot refused the API key (doveadm_key_file)"),
    ("silent", "unreachable", f"no answer within {TIMEOUT} s"),
    ("nobody listening", "unreachable", "cannot connect: ConnectionRefusedError"),
])
@pytest_twisted.ensureDeferred
async def test_a_dovecot_that_cannot_be_reached_leaves_the_revocation_done_and_says_so(tmp_path, doveadm, case,
                                                                                         outcome, reason):
    url = f"http://127.0.0.1:{free_port()}/doveadm/v1" if case == "nobody listening" else doveadm.url
    doveadm.mode = "silent" if case == "silent" else "kick"
    bridge = bridge_over(tmp_path, url, b"wrong-key" if case == "wrong key" else KEY)
    browser = signed_in_browser(bridge)
    tokens = granted(bridge, browser, "mail", "imap")
    started = time.monotonic()
    answer = await revoke(browser, "mail")
    assert time.monotonic() - started < TIMEOUT + 1
    assert notice(answer).endswith(UNREACHED)
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

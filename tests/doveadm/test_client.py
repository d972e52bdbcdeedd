"""The doveadm client against a fake doveadm HTTP API on loopback (tests/doveadm/fake.py, the
`doveadm` fixture of tests/conftest.py): what it sends, and each answer (kicked, nothing open,
wrong key, silence, an error, nobody listening) as an outcome, never a failure. The real Dovecot:
tests/test_peers_revoke.py."""

from __future__ import annotations

import base64
import dataclasses
import time

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from bearerbridge.config import Config, ConfigError, DovecotSettings, SaslSettings
from bearerbridge.doveadm.client import Doveadm
from bearerbridge.doveadm.protocol import Kicked, Outcome, Target

from ..support import free_port
from .fake import KEY


def client(url: str, key: bytes = KEY, timeout: float = 2.0) -> Doveadm:
    return Doveadm(DovecotSettings(doveadm_url=url, doveadm_key_file="unused", timeout=timeout), SaslSettings(), key)


@pytest.fixture
def logged():
    """The text of every log event while the test runs."""
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) or "")
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_kick_posts_json_with_the_key_and_counts_what_ended(doveadm, logged):
    doveadm.sessions = 2
    kicked = await client(doveadm.url).kick(Target("alice", ("192.0.2.7/32",)))
    assert kicked == Kicked(Outcome.ENDED, 2)
    [seen] = doveadm.seen
    assert (seen.method, seen.path) == (b"POST", b"/doveadm/v1")
    assert seen.authorization == "X-Dovecot-API " + base64.b64encode(KEY).decode()
    assert seen.content_type == "application/json"
    assert seen.commands == [["who", {"mask": ["alice", "192.0.2.7/32"], "separate-connections": True}, "who0"],
                             ["kick", {"mask": ["alice", "192.0.2.7/32"]}, "kick0"]]
    assert any("Dovecot ended 2 session(s) of alice (192.0.2.7/32)" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_no_session_open_is_an_outcome_not_an_error(doveadm):
    doveadm.mode = "none"
    assert await client(doveadm.url).kick(Target("alice")) == Kicked(Outcome.NONE_OPEN)


@pytest_twisted.ensureDeferred
async def test_a_wrong_key_is_refused_and_the_key_is_never_logged(doveadm, logged):
    kicked = await client(doveadm.url, key=b"wrong-key-123").kick(Target("alice"))
    assert kicked.outcome is Outcome.REFUSED
    assert any("refused" in line and "alice" in line for line in logged)
    text = "\n".join(logged)
    assert "wrong-key-123" not in text and base64.b64encode(b"wrong-key-123").decode() not in text


@pytest_twisted.ensureDeferred
async def test_a_silent_dovecot_is_given_up_on_at_the_timeout(doveadm):
    doveadm.mode = "silent"
    started = time.monotonic()
    kicked = await client(doveadm.url, timeout=0.3).kick(Target("alice"))
    assert kicked == Kicked(Outcome.UNREACHABLE, reason="no answer within 0.3 s")
    assert 0.3 <= time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
async def test_an_http_error_and_an_exit_code_fail_clearly(doveadm):
    doveadm.mode = 500
    assert await client(doveadm.url).kick(Target("alice")) == Kicked(Outcome.FAILED, reason="HTTP 500")
    doveadm.mode = "usage"
    kicked = await client(doveadm.url).kick(Target("alice"))
    assert kicked == Kicked(Outcome.FAILED, reason="kick: exitCode, exit code 64 (usage error)")


@pytest_twisted.ensureDeferred
async def test_nobody_listening_is_unreachable_at_once():
    started = time.monotonic()
    kicked = await client(f"http://127.0.0.1:{free_port()}/doveadm/v1").kick(Target("alice"))
    assert kicked.outcome is Outcome.UNREACHABLE and kicked.reason.startswith("cannot connect")
    assert time.monotonic() - started < 1


@pytest_twisted.ensureDeferred
async def test_a_name_doveadm_reads_as_a_pattern_is_never_sent(doveadm):
    kicked = await client(doveadm.url).kick(Target("*"))
    assert kicked.outcome is Outcome.FAILED and "wildcards" in kicked.reason
    assert doveadm.seen == []


def test_from_config_reads_the_key_file_at_start(tmp_path):
    assert Doveadm.from_config(Config()) is None  # no doveadm_url: off
    key_file = tmp_path / "doveadm.key"
    key_file.write_text("  s3cret-api-key\n")
    dovecot = DovecotSettings(doveadm_url="http://127.0.0.1:1/doveadm/v1", doveadm_key_file=str(key_file))
    made = Doveadm.from_config(dataclasses.replace(Config(), dovecot=dovecot))
    assert made is not None
    assert made._headers.getRawHeaders(b"Authorization") == [b"X-Dovecot-API " + base64.b64encode(KEY)]
    for content, message in ((None, "cannot read"), ("\n", "is empty")):
        key_file.unlink(missing_ok=True)
        if content is not None:
            key_file.write_text(content)
        with pytest.raises(ConfigError, match=rf"^\[dovecot\] doveadm_key_file: .*{message}"):
            Doveadm.from_config(dataclasses.replace(Config(), dovecot=dovecot))

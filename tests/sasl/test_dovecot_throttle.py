"""The Dovecot socket's throttle: failures answered late on timers, per user named and per `rip`;
an address that keeps failing refused unchecked for a while, as a temporary failure."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bearerbridge.guard import MemoryDoor
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.dovecot import DovecotAuthProtocol
from bearerbridge.sasl.verdict import Verdict
from bearerbridge.throttle import ThrottleRules

from ..fakes import MemoryAudit
from .test_dovecot import PLAIN, b64

RULES = ThrottleRules(free_failures=0, first_delay=2.0, max_delay=2.0, account_block_after=0,
                      address_block_after=3, block=60, forget_after=900)
GOOD = "good-token"


def validate(bearer, service):
    """alice's token is good; every other is not. Answered at once, as from the validator's memory."""
    return Verdict(ok=True, username="alice") if bearer.token == GOOD else Verdict(ok=False, reason="unknown")


class Socket:
    def __init__(self, door: MemoryDoor, clock: Clock) -> None:
        self.protocol = DovecotAuthProtocol(validate, clock=clock, door=door)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(b"VERSION\t1\t0\nCPID\t1\n")
        self.transport.clear()

    def plain(self, request_id: str, user: str, token: str, rip: str) -> bytes:
        message = f"\x00{user}\x00{token}".encode()
        self.protocol.dataReceived(f"AUTH\t{request_id}\tPLAIN\tservice=imap\trip={rip}\tresp={b64(message)}\n"
                                   .encode())
        return self.take()

    def take(self) -> bytes:
        written = self.transport.value()
        self.transport.clear()
        return written


def setup():
    clock, metrics, audit = Clock(), Metrics(), MemoryAudit()
    door = MemoryDoor("sasl", RULES, metrics, audit, clock)
    return clock, door, metrics, audit


def test_a_failure_is_answered_after_the_delay_and_holds_up_no_other_login():
    clock, door, _, _ = setup()
    attacker, others = Socket(door, clock), Socket(door, clock)
    assert attacker.plain("1", "alice", "guess", "192.0.2.66") == b""  # held...
    assert others.plain("1", "alice", GOOD, "192.0.2.7") == b"OK\t1\tuser=alice\n"  # ...and others go on
    assert attacker.plain("2", "bob", GOOD, "192.0.2.66") == b"OK\t2\tuser=alice\n"  # on the same connection too
    clock.advance(1.9)
    assert attacker.take() == b""
    clock.advance(0.1)
    assert attacker.take() == b"FAIL\t1\treason=invalid_token\n"  # like Dovecot's auth_failure_delay


def test_an_address_that_keeps_failing_is_refused_unchecked_then_let_in_again():
    clock, door, metrics, audit = setup()
    socket = Socket(door, clock)
    for i in range(3):
        socket.plain(str(i), "alice", "guess", "192.0.2.66")
    clock.advance(2)
    assert socket.take().count(b"FAIL") == 3
    assert socket.plain("9", "alice", GOOD, "192.0.2.66") == b""  # refused, held like a failure
    clock.advance(2)
    assert socket.take() == b"FAIL\t9\treason=too many failed logins from this address; try again later\ttemp\n"
    assert socket.plain("10", "alice", GOOD, "192.0.2.7") == b"OK\t10\tuser=alice\n"  # another address: unaffected
    assert audit.of("throttled") == [{"door": "sasl", "address": "192.0.2.66", "seconds": 60}]
    assert metrics.registry.get_sample_value("bearerbridge_throttle_refused_total", {"door": "sasl"}) == 1
    clock.advance(60)
    assert socket.plain("11", "alice", GOOD, "192.0.2.66") == b"OK\t11\tuser=alice\n"


def test_a_user_named_is_delayed_but_never_blocked():
    clock, door, _, _ = setup()
    socket = Socket(door, clock)
    for i in range(20):  # from twenty addresses, so that no address blocks
        socket.plain(str(i), "alice", "guess", f"198.51.100.{i}")
    clock.advance(2)
    assert socket.take().count(b"FAIL") == 20
    assert socket.plain("99", "alice", GOOD, "203.0.113.1") == b"OK\t99\tuser=alice\n"


def test_without_a_rip_or_with_a_bad_one_only_the_user_counts():
    clock, door, _, _ = setup()
    socket = Socket(door, clock)
    for i, rip in enumerate(["", "not-an-address", "999.1.1.1", "", ""]):
        socket.plain(str(i), "alice", "guess", rip)
    clock.advance(2)
    assert socket.take().count(b"FAIL") == 5
    assert len(door.counts) == 1  # alice's; no address was made up


def test_a_database_outage_is_not_counted_as_a_failure():
    clock, door, _, _ = setup()
    protocol = DovecotAuthProtocol(lambda bearer, service: defer.succeed(
        Verdict(ok=False, temporary=True, reason="database_unavailable")), clock=clock, door=door)
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(b"VERSION\t1\t0\nAUTH\t1\tPLAIN\tservice=imap\trip=192.0.2.1\tresp=" + b64(PLAIN).encode()
                          + b"\n")
    assert transport.value() == b"FAIL\t1\treason=database_unavailable\ttemp\n"  # at once, and not counted
    assert len(door.counts) == 0

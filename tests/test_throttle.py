"""throttle.py: the arithmetic of failed logins, and the counts kept in memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bearerbridge.throttle import (
    FailureCounts,
    KeyKind,
    ThrottleRules,
    account_key,
    address_key,
    delay,
    keys_of,
)

RULES = ThrottleRules(free_failures=2, first_delay=1.0, max_delay=8.0, account_block_after=5,
                      address_block_after=8, block=300, forget_after=900)


def test_the_delay_grows_after_the_free_failures_and_stops_at_its_cap():
    assert [delay(n, RULES) for n in range(1, 9)] == [0, 0, 1, 2, 4, 8, 8, 8]


@given(st.integers(min_value=0, max_value=10_000))
def test_no_delay_is_ever_past_the_cap(failures):
    assert 0 <= delay(failures, RULES) <= RULES.max_delay


def test_an_account_is_blocked_at_its_threshold_then_free_again_after_the_block():
    counts = FailureCounts(RULES)
    alice = [account_key("Alice", RULES)]
    for _ in range(4):
        assert counts.failed(alice, now=100.0).blocked == ()
        assert counts.blocked_for(alice, now=100.0) == 0
    assert counts.failed(alice, now=100.0).blocked == tuple(alice)  # the fifth starts the block
    assert counts.blocked_for(alice, now=100.0) == 300
    assert counts.blocked_for([account_key("ALICE", RULES)], now=399.0) == 1  # names are case-folded
    assert counts.blocked_for(alice, now=400.0) == 0  # no block outlives its `block` seconds
    assert counts.failed(alice, now=400.0).delay == 0  # and the count started again


def test_failures_are_forgotten_after_forget_after():
    counts = FailureCounts(RULES)
    bob = [account_key("bob", RULES)]
    for _ in range(4):
        counts.failed(bob, now=0.0)
    assert counts.failed(bob, now=RULES.forget_after + 1).delay == 0  # counted from one again


def test_a_success_forgives_the_account_but_not_the_address():
    counts = FailureCounts(RULES)
    keys = keys_of("carol", "192.0.2.7", RULES)
    for _ in range(4):
        counts.failed(keys, now=0.0)
    counts.succeeded(keys)
    failed = counts.failed(keys, now=1.0)
    assert failed.delay == 4  # the address's fifth failure; the account's first
    assert counts.failed([keys[0]], now=1.0).delay == 0


def test_the_longest_delay_of_the_keys_holds_the_answer_and_a_key_without_a_threshold_never_blocks():
    counts = FailureCounts(RULES)
    never = ThrottleRules(account_block_after=0)
    key = account_key("dave", never)
    assert key.block_after is None and key.kind is KeyKind.ACCOUNT
    for _ in range(50):
        counts.failed([key], now=0.0)
    assert counts.blocked_for([key], now=0.0) == 0
    assert counts.failed([key, address_key("192.0.2.9", RULES)], now=0.0).delay == RULES.max_delay


def test_memory_holds_at_most_max_keys_dropping_the_least_recently_failed():
    counts = FailureCounts(RULES, max_keys=3)
    for i in range(10):
        counts.failed([address_key(f"192.0.2.{i}", RULES)], now=float(i))
    assert len(counts) == 3
    counts.failed([address_key("192.0.2.9", RULES)], now=10.0)
    assert counts.failed([address_key("192.0.2.9", RULES)], now=10.0).delay == 1  # its third: kept

"""Failed logins counted per key (a user name, a client, an address): a growing delay, then a short block.

The rules are pure functions of a key's `Strikes` and the time, so that the same arithmetic
serves the counts kept in the database (`SqlStore.begin_attempts`: the sign-in doors, where a
guessed password would let an attacker in and every instance must see the same counts) and
the counts kept in memory (`FailureCounts`: the doors whose secrets are 256 random bits, where
guessing is hopeless and the throttle spares CPU and logs; a database write per failure at
thousands a second would cost more than it protects).

A key's failures are forgotten `forget_after` seconds after its last one. Past `free_failures`
each failure is answered after a delay that doubles from `first_delay` up to `max_delay`. A key
that reaches its `block_after` failures is blocked for `block` seconds: attempts are refused
without a check, then the count starts again. No block outlives its `block` seconds, so no one
can lock a user out for good; the sign-in doors also let a browser that has signed in as a user
before past that user's block (`web.sessions`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


def _at_least(minimum: int) -> Any:
    """Field metadata: an integer key that may also be `minimum` (by default they are positive)."""
    return {"min": minimum}


@dataclass(frozen=True)
class ThrottleRules:
    """How failed logins at one kind of door are slowed: `[throttle.*]` in the config. The
    defaults are the sign-in doors': a guessed password lets an attacker in."""
    # Failures of one key (an account, an address) answered at once; after them each waits
    # `first_delay` seconds, doubling with every further failure up to `max_delay`.
    free_failures: int = field(default=3, metadata=_at_least(0))
    first_delay: float = 1.0
    max_delay: float = 8.0
    # Failures within `forget_after` seconds that block the account (0: never) or the address
    # for `block` seconds: attempts are then refused without a check.
    account_block_after: int = field(default=10, metadata=_at_least(0))
    address_block_after: int = field(default=20, metadata=_at_least(0))
    block: int = 300
    forget_after: int = 900


class KeyKind(StrEnum):
    """What a key counts: the account named (a user, a client) or the address attempts come from."""

    ACCOUNT = "account"
    ADDRESS = "address"


@dataclass(frozen=True, slots=True)
class Key:
    kind: KeyKind
    value: str
    block_after: int | None  # failures that start a block; None: this key is only ever delayed

    @property
    def name(self) -> str:
        """One string per key, for a dictionary or a database row."""
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class Strikes:
    """One key's recent failures (with, at the sign-in doors, attempts still being checked)."""

    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


def current(strikes: Strikes | None, now: float, rules: ThrottleRules) -> Strikes:
    """`strikes` as they stand at `now`: forgotten once `forget_after` has passed since the last
    failure and no block is running."""
    if strikes is None or (now >= strikes.blocked_until and now - strikes.last > rules.forget_after):
        return Strikes()
    return strikes


def blocked_for(strikes: Strikes, key: Key, now: float) -> float:
    """Seconds until `key` may try again (0: it may now). Counting attempts still being checked,
    a key at its threshold waits too: otherwise many guesses sent at once would all be checked."""
    if now < strikes.blocked_until:
        return strikes.blocked_until - now
    return 1.0 if key.block_after is not None and strikes.failures >= key.block_after else 0.0


def delay(failures: int, rules: ThrottleRules) -> float:
    """Seconds to hold the answer to a key's `failures`-th failure."""
    beyond = failures - rules.free_failures
    # The exponent is capped: 2 ** 10,000 overflows a float long after any delay has reached its cap.
    return 0.0 if beyond <= 0 else min(rules.first_delay * 2 ** min(beyond - 1, 64), rules.max_delay)


def struck(strikes: Strikes, now: float) -> Strikes:
    """One more failure (or attempt being checked)."""
    return dataclasses.replace(strikes, failures=strikes.failures + 1, last=now)


def blocked_if_due(strikes: Strikes, key: Key, now: float, rules: ThrottleRules) -> Strikes:
    """After a failure: a key that has reached its threshold starts a block, and its count anew."""
    if key.block_after is not None and strikes.failures >= key.block_after:
        return Strikes(0, now, now + rules.block)
    return strikes


def forgiven(strikes: Strikes, key: Key) -> Strikes:
    """After a success: the account's count is cleared (its owner knows the secret); an address
    only takes back the attempt counted while it was checked (others there may be guessing)."""
    if key.kind is KeyKind.ACCOUNT:
        return Strikes(blocked_until=strikes.blocked_until)
    return dataclasses.replace(strikes, failures=max(0, strikes.failures - 1))


@dataclass(frozen=True, slots=True)
class Failed:
    """What a failure did: hold the answer `delay` seconds; `blocked` keys started a block now."""

    delay: float
    blocked: tuple[Key, ...] = ()


class FailureCounts:
    """Counts in this process's memory, at most `max_keys` of them (the least recently failed are
    dropped first, so that failures from many addresses cannot fill memory). Forgetting is part of
    reading: a key's count is dropped once `forget_after` has passed (`current`)."""

    def __init__(self, rules: ThrottleRules, max_keys: int = 100_000) -> None:
        self.rules = rules
        self._max_keys = max_keys
        self._strikes: OrderedDict[str, Strikes] = OrderedDict()  # least recently failed first

    def __len__(self) -> int:
        return len(self._strikes)

    def blocked_for(self, keys: Sequence[Key], now: float) -> float:
        """Seconds until every one of `keys` may try again (0: now)."""
        if not self._strikes:  # the usual case: nobody has failed lately
            return 0.0
        return max((blocked_for(current(self._strikes.get(key.name), now, self.rules), key, now) for key in keys),
                   default=0.0)

    def failed(self, keys: Iterable[Key], now: float) -> Failed:
        """Count a failure of each key; the answer waits for the longest delay among them."""
        longest = 0.0
        blocked = []
        for key in keys:
            strikes = struck(current(self._strikes.pop(key.name, None), now, self.rules), now)
            longest = max(longest, delay(strikes.failures, self.rules))
            after = blocked_if_due(strikes, key, now, self.rules)
            if after.blocked_until != strikes.blocked_until:
                blocked.append(key)
            self._strikes[key.name] = after
        while len(self._strikes) > self._max_keys:
            self._strikes.popitem(last=False)
        return Failed(longest, tuple(blocked))

    def succeeded(self, keys: Iterable[Key]) -> None:
        """An account that proved its secret is forgiven its failures."""
        for key in keys:
            if key.kind is KeyKind.ACCOUNT and key.name in self._strikes:
                self._strikes[key.name] = forgiven(self._strikes[key.name], key)


def account_key(account: str, rules: ThrottleRules) -> Key:
    """The key of a user name (case-folded, as names are matched) or a client id."""
    return Key(KeyKind.ACCOUNT, account.casefold(), rules.account_block_after or None)


def address_key(address: str, rules: ThrottleRules) -> Key:
    """The key of an IP address (an IPv6 /64), as `connections.peer_address` or Dovecot's `rip` gives it."""
    return Key(KeyKind.ADDRESS, address, rules.address_block_after or None)


def keys_of(account: str | None, address: str | None, rules: ThrottleRules) -> list[Key]:
    """The keys an attempt counts on: the account it names and the address it comes from, where known."""
    return ([account_key(account, rules)] if account else []) + ([address_key(address, rules)] if address else [])

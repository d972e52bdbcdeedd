"""A door's throttle in the running service: the counts (throttle.py), the clock that holds a
failure's answer, the metrics, and the audit log's `throttled` events."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from bearerbridge.metrics import Metrics
from bearerbridge.storage.pool import StorePool
from bearerbridge.throttle import Failed, FailureCounts, Key, KeyKind, ThrottleRules, keys_of

T = TypeVar("T")


class Recorder(Protocol):
    """Where security events go (`audit.AuditLog`)."""

    def record(self, event: str, **fields: Any) -> None: ...


class Door:
    """A kind of door (`clients`, `sasl`, `sign_in`): what its throttle did, counted and audited."""

    def __init__(self, name: str, rules: ThrottleRules, metrics: Metrics, audit: Recorder,
                 clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor  # here: importing this module installs no reactor

            clock = reactor
        self.name = name
        self.rules = rules
        self.clock: IReactorTime = clock
        self._metrics = metrics
        self._audit = audit

    def keys(self, account: str | None, address: str | None) -> list[Key]:
        return keys_of(account, address, self.rules)

    def refused(self) -> None:
        """An attempt refused unchecked, by a block."""
        self._metrics.throttle_refused.labels(self.name).inc()

    def failed(self, failed: Failed, keys: Sequence[Key]) -> float:
        """Count and audit what a failure did; the seconds to hold its answer."""
        if failed.delay:
            self._metrics.throttle_delayed.labels(self.name).inc()
        for key in failed.blocked:
            self._metrics.throttle_blocks.labels(self.name, key.kind).inc()
            named = {"account": key.value} if key.kind is KeyKind.ACCOUNT else {"address": key.value}
            self._audit.record("throttled", door=self.name, seconds=self.rules.block, **named)
        return failed.delay

    def hold(self, seconds: float, value: T) -> defer.Deferred[T]:
        """`value`, after `seconds` on a timer: nothing else waits meanwhile."""
        return task.deferLater(self.clock, seconds, lambda: value) if seconds > 0 else defer.succeed(value)


class MemoryDoor(Door):
    """A door whose failures are counted in this process's memory (`throttle.FailureCounts`)."""

    def __init__(self, name: str, rules: ThrottleRules, metrics: Metrics, audit: Recorder,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(name, rules, metrics, audit, clock)
        self.counts = FailureCounts(rules)

    def blocked_for(self, keys: Sequence[Key]) -> float:
        """Seconds until these keys may try again (0: now); a refusal is counted."""
        wait = self.counts.blocked_for(keys, self.clock.seconds())
        if wait:
            self.refused()
        return wait

    def outcome(self, keys: Sequence[Key], ok: bool) -> float:
        """Note how a checked attempt came out; the seconds to hold a failure's answer."""
        if ok:
            self.counts.succeeded(keys)
            return 0.0
        return self.failed(self.counts.failed(keys, self.clock.seconds()), keys)


@dataclass(frozen=True)
class Blocked:
    """An attempt refused without a check: try again in `retry_after` seconds."""

    retry_after: float

    @property
    def in_words(self) -> str:
        """The wait for a person to read: whole minutes, rounded up, or a few seconds (while
        attempts already sent are still being checked)."""
        if self.retry_after < 30:
            return "a few seconds"
        minutes = max(1, math.ceil(self.retry_after / 60))
        return f"{minutes} minute{'s' if minutes > 1 else ''}"


class DatabaseDoor(Door):
    """A door whose attempts are counted in the database (`SqlStore.begin_attempts`), so that every
    instance sharing it sees them: the sign-in doors, where a guessed password lets one in."""

    def __init__(self, name: str, rules: ThrottleRules, pool: StorePool, metrics: Metrics, audit: Recorder,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(name, rules, metrics, audit, clock)
        self._pool = pool

    async def attempt(self, keys: Sequence[Key], check: Callable[[], Awaitable[T | None]]) -> T | Blocked | None:
        """Run `check` (None: the credential was wrong) unless a key is blocked. The attempt is
        counted before the check, so guesses sent at once cannot all be checked; a failure's
        answer is held for its delay."""
        store = self._pool.store
        wait = await self._pool.run(store.begin_attempts, keys, self.clock.seconds(), self.rules)
        if wait:
            self.refused()
            return Blocked(wait)
        result = await check()
        settled = await self._pool.run(store.settle_attempts, keys, result is not None, self.clock.seconds(),
                                       self.rules)
        if result is None:
            await self.hold(self.failed(settled, keys), None)
        return result

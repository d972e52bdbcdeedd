"""Failed sign-ins in the database (`throttle_strikes`), with throttle.py's arithmetic.

Each call locks the rows of its keys (PostgreSQL: `SELECT ... FOR UPDATE`, in key order so
that two calls cannot wait for each other; SQLite: its one writer at a time), so that attempts
at several instances at once are all counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from bearerbridge.storage.schema import throttle_strikes
from bearerbridge.throttle import (
    Failed,
    Key,
    Strikes,
    ThrottleRules,
    blocked_for,
    blocked_if_due,
    current,
    delay,
    forgiven,
    struck,
)

Digest = Callable[[str], str]


def _locked(db: Connection, digests: Sequence[str]) -> dict[str, Strikes]:
    """The rows of `digests`, made if missing and locked until the transaction ends."""
    insert = (postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert)(throttle_strikes)
    db.execute(insert.on_conflict_do_nothing(), [
        {"key_digest": d, "failures": 0, "last": 0.0, "blocked_until": 0.0, "expires_at": 0.0} for d in digests])
    rows = db.execute(sa.select(throttle_strikes).where(throttle_strikes.c.key_digest.in_(digests))
                      .order_by(throttle_strikes.c.key_digest).with_for_update())
    return {row.key_digest: Strikes(row.failures, row.last, row.blocked_until) for row in rows}


def _save(db: Connection, digest: str, strikes: Strikes, rules: ThrottleRules) -> None:
    db.execute(throttle_strikes.update().where(throttle_strikes.c.key_digest == digest).values(
        failures=strikes.failures, last=strikes.last, blocked_until=strikes.blocked_until,
        expires_at=max(strikes.last + rules.forget_after, strikes.blocked_until)))


def begin_attempts(db: Connection, digest: Digest, keys: Sequence[Key], now: float, rules: ThrottleRules) -> float:
    """Count an attempt of each key before its check (so that guesses sent at once cannot all be
    checked), and return 0; or, if a key is blocked, count nothing and return the seconds to wait."""
    digests = [digest(key.name) for key in keys]
    found = _locked(db, sorted(digests))
    standing = [current(found[d], now, rules) for d in digests]
    wait = max((blocked_for(s, key, now) for s, key in zip(standing, keys, strict=True)), default=0.0)
    if wait == 0:
        for d, s in zip(digests, standing, strict=True):
            _save(db, d, struck(s, now), rules)
    return wait


def settle_attempts(db: Connection, digest: Digest, keys: Sequence[Key], ok: bool, now: float,
                    rules: ThrottleRules) -> Failed:
    """The outcome of attempts begun with `begin_attempts`: a success forgives, a failure stays
    counted, may start a block, and says how long to hold its answer."""
    digests = [digest(key.name) for key in keys]
    found = _locked(db, sorted(digests))
    longest, blocked = 0.0, []
    for d, key in zip(digests, keys, strict=True):
        strikes = current(found[d], now, rules)
        if ok:
            after = forgiven(strikes, key)
        else:
            longest = max(longest, delay(strikes.failures, rules))
            after = blocked_if_due(strikes, key, now, rules)
            if after.blocked_until != strikes.blocked_until:
                blocked.append(key)
        _save(db, d, after, rules)
    return Failed(longest, tuple(blocked))


def purge(db: Connection, now: float) -> int:
    """Delete the rows that no longer count; how many went."""
    return db.execute(throttle_strikes.delete().where(throttle_strikes.c.expires_at < now)).rowcount

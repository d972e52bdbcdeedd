"""When each grant was last used at each service, and from where: noted in memory where a token
is accepted, written behind in batches (issue 12: the user's "connected apps").

Every surface that accepts a token notes the use in a `LastUses`: the Dovecot socket (the SASL
service, Dovecot's `rip`), `POST /sasl`, `/forward-auth` (the rule's service, the client's
address as the proxy forwards it), `/userinfo` and a resource server's `/introspect`. A note is
one dict assignment, the latest address of each (grant, service) replacing the one before:
~0.3 µs of a hot check's ~15 (bench/README.md). Every `FLUSH_EVERY` seconds `UseRecorder` takes
what was noted, dates it with one clock read (so a use is dated up to `FLUSH_EVERY` seconds
late, and the memory needs no clock) and hands it to the store's pool (`storage.uses.record`,
an upsert keeping the later time), a transaction per `CHUNK` rows, and once more when the
service stops. A batch the database refuses is dropped, counted and logged once: the next login
notes its grant again, and no login ever waits for it.
"""

from __future__ import annotations

import itertools

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bearerbridge.audit import AuditLog
from bearerbridge.metrics import Metrics
from bearerbridge.storage.apppasswords import FAMILY_PREFIX
from bearerbridge.storage.pool import StorePool
from bearerbridge.storage.uses import Batch

log = Logger()

FLUSH_EVERY = 5.0  # seconds: what the user's page may lag behind; one small transaction each
# (grant, service) pairs remembered between two flushes; ~200 bytes each. Past it, a pair not yet
# noted is lost (counted): that is more than 20,000 grants used a second for FLUSH_EVERY seconds.
LIMIT = 100_000
# Rows written a transaction: on SQLite the pool has one thread, so a login whose token must be
# read waits behind a write. 250 new rows take ~3.5 ms there (~20 ms with the WAL checkpoint that
# some commits make), 1,000 ~24 ms, and 80,000 in one held the pool for over a second
# (sasl_bench's cold run: every login a grant never seen, 16,000 a second).
CHUNK = 250


class LastUses:
    """The grants used at each service since the last `take`, each with the address of its latest
    use, at most `limit` (grant, service) pairs.

    Sans-IO: no clock (the recorder dates a batch when it takes it), and nothing here writes
    anything. Filled and emptied on the reactor thread only."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._latest: dict[tuple[str, str], str | None] = {}
        self.overflowed = 0  # uses of pairs not noted for want of room since the last take

    def note(self, family: str, service: str, address: str | None) -> None:
        """A token of grant `family` was accepted for `service`, just now, from `address` (as the
        service saw it; stored only if it is an IP address). The hot path: a dict assignment."""
        latest = self._latest
        latest[family, service] = address
        if len(latest) > self.limit:  # only a pair new to a full memory grows it: drop that one
            del latest[family, service]
            self.overflowed += 1

    def __len__(self) -> int:
        return len(self._latest)

    def take(self) -> tuple[dict[tuple[str, str], str | None], int]:
        """What was noted since the last take, and how many uses were lost for want of room;
        the memory starts afresh (so that a batch being written never changes under its writer)."""
        taken, self._latest = self._latest, {}
        overflowed, self.overflowed = self.overflowed, 0
        return taken, overflowed


class UseRecorder(TimerService):
    """Writes what `uses` noted every `every` seconds, and once more when the service stops.

    Add it to the service tree after the StorePool: a MultiService stops its children in reverse
    order, so the last batch reaches the pool's queue before the pool stops (and its threads
    finish the queue first)."""

    name = "use-recorder"

    def __init__(self, uses: LastUses, pool: StorePool, metrics: Metrics, every: float = FLUSH_EVERY,
                 clock: IReactorTime | None = None, audit: AuditLog | None = None) -> None:
        super().__init__(every, self.flush)
        self._audit = audit  # told of app passwords used for the first time (app_password_first_use)
        self.clock = clock
        if clock is None:
            from twisted.internet import reactor  # here: importing this module installs no reactor

            clock = reactor
        self._now = clock.seconds  # what a batch is dated with
        self._uses = uses
        self._pool = pool
        self._metrics = metrics
        self._failing = False  # the last write failed: the next failure is not logged again
        self._overflow_told = False

    def flush(self) -> defer.Deferred[None]:
        """Write what was noted since the last flush, dated now, in the pool: one transaction per
        `CHUNK` rows, one after another; never fails (the TimerService would stop calling it).
        Nothing noted: no trip to the pool."""
        taken, overflowed = self._uses.take()
        if overflowed:
            self._metrics.uses_lost.labels("full").inc(overflowed)
            if not self._overflow_told:
                self._overflow_told = True
                log.warn("More than {limit} grants were used at a service within {every} s: the last uses of "
                         "some were not recorded (counted in bearerbridge_uses_lost_total)",
                         limit=self._uses.limit, every=self.step)
        if not taken:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._write(taken, self._now()))

    async def _write(self, taken: dict[tuple[str, str], str | None], at: float) -> None:
        """The chunks of a batch, each made as it is sent; a failure drops the rest of the batch."""
        items, left = iter(taken.items()), len(taken)
        while left:
            chunk = {key: (at, address) for key, address in itertools.islice(items, CHUNK)}
            try:
                count = await self._pool.run(self._record, chunk)
            except Exception:
                self._dropped(Failure(), left)
                return
            left -= len(chunk)
            self._written(count)

    def _record(self, batch: Batch) -> int:
        """In the pool, one transaction: the app passwords of the batch used for the first time
        (none of their uses recorded yet; audited, as the audit log is, inside the transaction),
        then the batch written."""
        if self._audit is not None and any(family.startswith(FAMILY_PREFIX) for family, _ in batch):
            for first in self._pool.store.first_app_uses(batch):
                password = first.password
                self._audit.record("app_password_first_use", user=password.username, family=password.family,
                                   name=password.name, services=list(first.services), address=first.address)
        return self._pool.store.record_uses(batch)

    def _written(self, count: int) -> None:
        self._metrics.uses_recorded.inc(count)
        if self._failing:
            self._failing = False
            log.info("Recording when grants were last used works again")

    def _dropped(self, failure: Failure, count: int) -> None:
        self._metrics.uses_lost.labels("database").inc(count)
        if not self._failing:
            self._failing = True
            log.error("Recording when grants were last used failed, {count} dropped ({error}); further failures "
                      "drop their batches too, counted in bearerbridge_uses_lost_total, until it works again",
                      count=count, error=failure.getErrorMessage())

    def stopService(self) -> defer.Deferred[None]:
        """Stop the timer (a write in flight ends in its time) and write what is left at once."""
        if not self.running:  # never started (twistd stopped before it ran): nothing was noted
            return defer.succeed(None)
        stopped = super().stopService()
        last = self.flush()
        return defer.gatherResults([stopped, last]).addCallback(lambda _: None)

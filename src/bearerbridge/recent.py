"""What the store read in the last few seconds, for the paths that should not wait for it.

The SASL validator and introspection are asked about the same few tokens over and over.
The store records the clients and access tokens it reads (`SqlStore.recent`), and these
paths answer from that record while it is fresh: younger than `ttl` seconds (`[sasl]
cache_ttl`) and read in the store's current `generation`, which moves on with every
revocation, disabled user or deleted client committed in this process. A change made by
another process sharing the database is therefore seen within `ttl`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

LIMIT = 100_000


class NeedsDatabase(LookupError):
    """Nothing fresh is remembered: the caller must ask the database."""


@dataclass(frozen=True)
class _Entry:
    value: Any
    read_at: float
    generation: int


class RecentReads:
    """A bounded memory of records by (kind, key). Safe to fill from pool threads."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}

    def remember(self, kind: str, key: str, value: Any, generation: int) -> None:
        """Note a record read in `generation` (taken before the read began)."""
        if len(self._entries) >= LIMIT:
            self._entries.clear()  # simpler than an LRU, and a refill costs one read each
        self._entries[(kind, key)] = _Entry(value, self._clock(), generation)

    def recall(self, kind: str, key: str, generation: int) -> Any:
        """The remembered record, or NeedsDatabase if none is fresh."""
        return self.recall_with_age(kind, key, generation)[0]

    def recall_with_age(self, kind: str, key: str, generation: int) -> tuple[Any, float]:
        """`recall`, and how many seconds ago the record was read."""
        entry = self._entries.get((kind, key))
        age = self._clock() - entry.read_at if entry is not None else self.ttl
        if age >= self.ttl or entry.generation != generation:
            raise NeedsDatabase(kind)
        return entry.value, age


class RememberedStore:
    """The store's read methods that introspection uses, answered from memory alone.

    Hand it to authlib in place of the store: a miss raises NeedsDatabase, and the caller
    runs the request again against the real store in the pool.
    """

    def __init__(self, store: Any, recent: RecentReads) -> None:
        self._store = store
        self._recent = recent
        self.keyring = store.keyring

    def get_client(self, client_id: str):
        return self._recent.recall("client", client_id, self._store.generation)

    find_client = get_client

    def find_access_token(self, access_token: str):
        return self._recent.recall("token", self.keyring.digest(access_token), self._store.generation)

    def find_refresh_token(self, refresh_token: str):
        raise NeedsDatabase("refresh token")

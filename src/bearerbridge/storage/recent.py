"""What the store read in the last few seconds, for the paths that should not wait for it.

The SASL validator, forward-auth and introspection are asked about the same few clients
and tokens (and app passwords) over and over. The store notes here every client and access token it reads
(`SqlStore` is built with a `RecentReads`), and those paths answer from this record while
it is fresh: younger than `ttl` seconds (`[sasl] cache_ttl`) and read in the current
`generation`.

Invalidation lives here too. The store calls `invalidate()` after committing a change that
takes validity from tokens (a revocation, a disabled user, a deleted client); that moves
the generation on, and every record read before it is forgotten at once. A change made by
another process sharing the database is seen within `ttl`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bearerbridge.storage.apppasswords import AppPassword
from bearerbridge.storage.models import Client, Token

LIMIT = 100_000  # records of each kind

R = TypeVar("R", Client, Token, AppPassword)


@dataclass(frozen=True, slots=True)
class _Entry(Generic[R]):
    value: R
    read_at: float
    generation: int


class RecentReads:
    """A bounded memory of clients (by id), access tokens and app passwords (by digest). Safe to
    fill from pool threads; read on the reactor thread."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._clients: dict[str, _Entry[Client]] = {}
        self._tokens: dict[str, _Entry[Token]] = {}
        self._app_passwords: dict[str, _Entry[AppPassword]] = {}
        self.generation = 0
        self._generation_lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget everything remembered so far: validity was taken from some token."""
        with self._generation_lock:
            self.generation += 1

    # `generation` is the one taken before the read began, so that an invalidation committed
    # while the read ran is not masked by what it found.

    def remember_client(self, client: Client, generation: int) -> None:
        self._remember(self._clients, client.client_id, client, generation)

    def remember_token(self, digest: str, token: Token, generation: int) -> None:
        self._remember(self._tokens, digest, token, generation)

    def remember_app_password(self, digest: str, app_password: AppPassword, generation: int) -> None:
        self._remember(self._app_passwords, digest, app_password, generation)

    def app_password(self, digest: str) -> AppPassword | None:
        """The app password with this digest read lately, or None when nothing fresh is remembered."""
        found = self._fresh(self._app_passwords, digest)
        return found[0] if found is not None else None

    def client(self, client_id: str) -> Client | None:
        """The client read lately, or None when nothing fresh is remembered."""
        found = self._fresh(self._clients, client_id)
        return found[0] if found is not None else None

    def token(self, digest: str) -> tuple[Token, float] | None:
        """The access token with this digest and how many seconds ago it was read, or None
        when nothing fresh is remembered."""
        return self._fresh(self._tokens, digest)

    def _remember(self, table: dict[str, _Entry[R]], key: str, value: R, generation: int) -> None:
        if len(table) >= LIMIT:
            table.clear()  # simpler than an LRU, and a refill costs one read each
        table[key] = _Entry(value, self._clock(), generation)

    def _fresh(self, table: dict[str, _Entry[R]], key: str) -> tuple[R, float] | None:
        entry = table.get(key)
        if entry is None or entry.generation != self.generation:
            return None
        age = self._clock() - entry.read_at
        return (entry.value, age) if age < self.ttl else None

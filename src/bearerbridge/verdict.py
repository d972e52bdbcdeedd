"""The outcome of validating a bearer token, shared by every surface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # stdlib only at run time
    from twisted.internet.defer import Deferred

    from .sasl import Bearer


# Not frozen: one is built for every check, and a frozen dataclass's __init__ costs four
# times as much (bench/README.md). Treat it as immutable all the same.
@dataclass(slots=True)
class Verdict:
    """Whether a token is accepted, and what to tell the client if not.

    ``status`` and ``scope`` go into the RFC 7628 §3.2.2 error challenge;
    ``reason`` is for logs only (e.g. ``unknown``, ``expired``, ``revoked``,
    ``identity_mismatch``, ``insufficient_scope``). ``temporary`` marks a
    backend outage, which clients should report as "try again later".
    """

    ok: bool
    username: str | None = None
    status: str = "invalid_token"
    scope: str | None = None
    reason: str = ""
    temporary: bool = False

    @property
    def accepted(self) -> bool:
        """Log the client in: the token is good, and there is a name to report (Postfix and
        Prosody cannot use a success without one)."""
        return self.ok and bool(self.username)

    @property
    def unavailable(self) -> str | None:
        """Why there is no answer, or None when there is one. The backend failed, or said yes
        without a user name (a validator that gives none is as broken as one that is down, and
        the client's claimed identity is no substitute). Every surface then tells the client to
        try again later, never that the token is bad: it might throw a good token away."""
        if self.temporary:
            return self.reason or "temporary failure"
        if self.ok and not self.username:
            return "no user name for token"
        return None


# What every surface calls to decide a login: (bearer, service name) -> the Verdict, when it is
# known at once, or a Deferred firing with it; `defer.maybeDeferred` takes both. bearerbridge's
# own is `validator.Validator.validate`, which answers tokens it read recently at once.
Validate = Callable[["Bearer", str], "Verdict | Deferred[Verdict]"]

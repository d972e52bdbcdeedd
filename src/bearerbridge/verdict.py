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


# What every surface calls to decide a login: (bearer, service name) -> the Verdict, when it is
# known at once, or a Deferred firing with it; `defer.maybeDeferred` takes both. bearerbridge's
# own is `validator.Validator.validate`, which answers tokens it read recently at once.
Validate = Callable[["Bearer", str], "Verdict | Deferred[Verdict]"]

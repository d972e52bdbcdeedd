"""The outcome of validating a bearer token, shared by every surface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # stdlib only at run time
    from twisted.internet.defer import Deferred

    from .sasl import Bearer


@dataclass(frozen=True)
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


# What every surface calls to decide a login: (bearer, service name) -> Deferred[Verdict].
# bearerbridge's own is `validator.Validator.validate`.
Validate = Callable[["Bearer", str], "Deferred[Verdict]"]

"""The outcome of validating a bearer token, shared by every surface."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # stdlib only at run time
    from twisted.internet.defer import Deferred

    from bearerbridge.sasl.mechanisms import Bearer


class Reason(enum.StrEnum):
    """Why a login was decided as it was: bearerbridge's own reasons, in the decision log and
    as the `reason` label of `bearerbridge_sasl_decisions_total`. A validator of another
    kind (introspecting elsewhere, say) may give reasons of its own, as plain strings."""

    OK = "ok"
    # validator.judge: the request
    UNKNOWN_SERVICE = "unknown_service"
    PLAIN_NOT_ALLOWED = "plain_not_allowed"
    # validator.judge_token: the token
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    USER_DISABLED = "user_disabled"
    EXPIRED = "expired"
    NO_USER = "no_user"  # a client-credentials token names no one to log in
    IDENTITY_MISMATCH = "identity_mismatch"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    # judge.judge_app_password: an app password made for other services
    SERVICE_NOT_GRANTED = "service_not_granted"
    # forward-auth: the request matched no rule, or a path that could name two
    NO_RULE = "no_rule"
    AMBIGUOUS_PATH = "ambiguous_path"
    # no decision: the backend failed
    DATABASE_UNAVAILABLE = "database_unavailable"
    VALIDATION_TIMED_OUT = "validation timed out"
    VALIDATOR_ERROR = "validator error"
    # no check: the address has failed too often lately (throttle.py), told as a temporary failure
    THROTTLED = "too many failed logins from this address; try again later"
    # the metrics' label for a client message the mechanism refused (its own reason is logged)
    MALFORMED = "malformed"


# Not frozen: one is built for every check, and a frozen dataclass's __init__ costs four
# times as much (bench/README.md). Treat it as immutable all the same.
@dataclass(slots=True)
class Verdict:
    """Whether a token is accepted, and what to tell the client if not.

    ``status`` and ``scope`` go into the RFC 7628 §3.2.2 error challenge;
    ``reason`` (a `Reason`, for logs and metrics) is never told to the client.
    ``temporary`` marks a backend outage, which clients should report as "try
    again later". ``family`` names the grant (the token family) of a token accepted
    by bearerbridge's own judge, and only of one accepted, so that the surface can note
    its use (uses.py).
    """

    ok: bool
    username: str | None = None
    status: str = "invalid_token"
    scope: str | None = None
    reason: Reason | str = ""
    temporary: bool = False
    family: str | None = None

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

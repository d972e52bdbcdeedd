"""The outcome of validating a bearer token, shared by every surface."""

from __future__ import annotations

from dataclasses import dataclass


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

"""Scope rules beyond a client's registration."""

from __future__ import annotations

from authlib.oauth2.rfc6749 import InvalidScopeError


def refuse_operator_scopes(scope: str | None, operator_scopes: tuple[str, ...]) -> None:
    """A user may not grant a scope only the operator grants (`[server] operator_scopes`)."""
    reserved = [s for s in (scope or "").split() if s in operator_scopes]
    if reserved:
        raise InvalidScopeError(f"Only the operator grants {' '.join(reserved)}")

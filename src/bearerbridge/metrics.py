"""Prometheus counters, in a registry of their own (served at /metrics)."""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The reasons validator.judge gives, and the surfaces' own for outages.
SASL_REASONS = frozenset({
    "ok", "unknown_service", "plain_not_allowed", "unknown", "revoked", "user_disabled", "expired", "no_user",
    "identity_mismatch", "insufficient_scope", "database_unavailable", "validation timed out", "validator error",
    "no_rule", "ambiguous_path"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.authorizations = Counter(
            "bearerbridge_authorizations", "Authorization requests answered, by outcome",
            ["outcome"], registry=self.registry)
        self.token_requests = Counter(
            "bearerbridge_token_requests", "Requests to the token endpoint, by grant type",
            ["grant_type"], registry=self.registry)
        self.tokens_issued = Counter(
            "bearerbridge_tokens_issued", "Tokens issued, by grant type",
            ["grant_type"], registry=self.registry)
        self.token_failures = Counter(
            "bearerbridge_token_failures", "Refused token requests, by grant type and reason",
            ["grant_type", "reason"], registry=self.registry)
        self.introspections = Counter(
            "bearerbridge_introspections", "Introspection answers, by result",
            ["result"], registry=self.registry)
        self.logins = Counter(
            "bearerbridge_logins", "Password logins, by result", ["result"], registry=self.registry)

        self.sasl_decisions = Counter(
            "bearerbridge_sasl_decisions", "SASL logins decided, by surface, mechanism, service and reason",
            ["surface", "mechanism", "service", "result", "reason"], registry=self.registry)
        self._sasl_children: dict[tuple[str, ...], Counter] = {}

    def sasl_decision(self, surface: str, services: Iterable[str], mechanism: str, service: str, ok: bool,
                      reason: str) -> None:
        """Count one SASL decision; names a client chose are folded so labels stay few."""
        service = service if service in services else "other"
        reason = reason if reason in SASL_REASONS else "malformed"
        labels = (surface, mechanism, service, "ok" if ok else "failed", reason)
        # Looking a child up by labels costs more than the rest of a remembered check.
        child = self._sasl_children.get(labels)
        if child is None:
            child = self._sasl_children[labels] = self.sasl_decisions.labels(*labels)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

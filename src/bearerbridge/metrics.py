"""Prometheus counters, in a registry of their own (served at /metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bearerbridge.sasl.verdict import Reason

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Any other reason (a mechanism's own words for a message it refused) is counted as malformed,
# so that a client cannot make up labels.
SASL_REASONS = frozenset(Reason)


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
        self.throttle_refused = Counter(
            "bearerbridge_throttle_refused", "Attempts refused without a check during a block, by door",
            ["door"], registry=self.registry)
        self.throttle_delayed = Counter(
            "bearerbridge_throttle_delayed", "Failed attempts answered after a delay, by door",
            ["door"], registry=self.registry)
        self.throttle_blocks = Counter(
            "bearerbridge_throttle_blocks", "Blocks started, by door and kind of key (account, address)",
            ["door", "key"], registry=self.registry)
        self.audit_lost = Gauge(
            "bearerbridge_audit_lost", "Security events the audit log could not write ([audit] file)",
            registry=self.registry)
        self.password_checks_waiting = Gauge(
            "bearerbridge_password_checks_waiting", "Password checks waiting for their turn ([passwords] "
            "checks_at_once)", registry=self.registry)
        self.uses_recorded = Counter(
            "bearerbridge_uses_recorded", "Last uses of grants at services written to the database (uses.py)",
            registry=self.registry)
        self.uses_lost = Counter(
            "bearerbridge_uses_lost", "Last uses of grants not recorded, by why: the database failed "
            "(a batch dropped) or too many at once (memory full)", ["why"], registry=self.registry)

        self.sasl_decisions = Counter(
            "bearerbridge_sasl_decisions", "SASL logins decided, by surface, mechanism, service and reason",
            ["surface", "mechanism", "service", "result", "reason"], registry=self.registry)
        self._sasl_children: dict[tuple[str, ...], Counter] = {}

    def sasl_decision(self, surface: str, services: Iterable[str], mechanism: str, service: str, ok: bool,
                      reason: Reason | str) -> None:
        """Count one SASL decision; names a client chose are folded so labels stay few."""
        service = service if service in services else "other"
        reason = reason if reason in SASL_REASONS else Reason.MALFORMED
        labels = (surface, mechanism, service, "ok" if ok else "failed", reason)
        # Looking a child up by labels costs more than the rest of a remembered check.
        child = self._sasl_children.get(labels)
        if child is None:
            child = self._sasl_children[labels] = self.sasl_decisions.labels(*labels)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus counters, in a registry of their own (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


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

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""/metrics behind a bearer token: by hand with requests, and scraped by a real Prometheus 2 using its
`oauth2:` client-credentials settings."""

from __future__ import annotations

import json
import subprocess
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .support import free_port, require_peer, token_request, wait_for

WAIT = 30  # seconds, the bound on every wait for Prometheus


def client_credentials_token(service, client: dict, scope: str) -> str:
    response = token_request(service, {"grant_type": "client_credentials", "scope": scope}, client)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_needs_a_token_with_the_metrics_scope(service):
    url = f"{service.url}/metrics"

    anonymous = requests.get(url, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "bearerbridge_" not in anonymous.text

    forged = requests.get(url, headers={"Authorization": "Bearer not-a-token-we-issued"}, timeout=10)
    assert forged.status_code == 401
    assert 'error="invalid_token"' in forged.headers["WWW-Authenticate"]
    assert "bearerbridge_" not in forged.text

    imap_client = service.client("--grant", "client_credentials", "--scope", "imap")
    imap_token = client_credentials_token(service, imap_client, "imap")
    wrong_scope = requests.get(url, headers={"Authorization": f"Bearer {imap_token}"}, timeout=10)
    assert wrong_scope.status_code == 403
    assert "insufficient_scope" in wrong_scope.headers["WWW-Authenticate"]
    assert "bearerbridge_" not in wrong_scope.text

    metrics_client = service.client("--grant", "client_credentials", "--scope", "metrics")
    metrics_token = client_credentials_token(service, metrics_client, "metrics")
    good = requests.get(url, headers={"Authorization": f"Bearer {metrics_token}"}, timeout=10)
    assert good.status_code == 200, good.text
    assert good.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family.type for family in text_string_to_metric_families(good.text)}
    for counter in ("bearerbridge_authorizations", "bearerbridge_token_requests", "bearerbridge_tokens_issued",
                    "bearerbridge_token_failures", "bearerbridge_introspections", "bearerbridge_logins"):
        assert families.get(counter) == "counter", (counter, families)
    values = samples(good.text)
    client_credentials = frozenset({("grant_type", "client_credentials")})
    assert values[("bearerbridge_token_requests_total", client_credentials)] >= 2  # the two tokens above
    assert values[("bearerbridge_tokens_issued_total", client_credentials)] >= 2
    # The service is shared with other tests, so count one more token from here.
    client_credentials_token(service, metrics_client, "metrics")
    after = samples(requests.get(url, headers={"Authorization": f"Bearer {metrics_token}"}, timeout=10).text)
    for counter in ("bearerbridge_token_requests_total", "bearerbridge_tokens_issued_total"):
        assert after[(counter, client_credentials)] == values[(counter, client_credentials)] + 1


@pytest.fixture
def prometheus(service, tmp_path):
    """A real Prometheus scraping the service with two oauth2 jobs: `good` (metrics scope), `bad` (imap)."""
    binary = require_peer("prometheus")
    good = service.client("--grant", "client_credentials", "--scope", "metrics")
    bad = service.client("--grant", "client_credentials", "--scope", "imap")
    target = urlsplit(service.url).netloc

    def job(name: str, client: dict, scope: str) -> dict:
        return {"job_name": name, "scrape_interval": "1s", "scrape_timeout": "1s", "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
                "oauth2": {"client_id": client["client_id"], "client_secret": client["client_secret"],
                           "token_url": f"{service.url}/token", "scopes": [scope]}}

    config = tmp_path / "prometheus.yml"  # JSON is YAML
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job("bearerbridge-metrics", good, "metrics"), job("bearerbridge-imap", bad, "imap")],
    }, indent=2))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=debug"],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)
    api = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            return requests.get(f"{api}/-/ready", timeout=2).status_code == 200
        wait_for(ready, timeout=WAIT, interval=0.2, what="prometheus to be ready")
        yield api, log
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def test_prometheus_scrapes_with_oauth2_client_credentials(prometheus):
    api, log = prometheus

    def scraped() -> dict[str, dict] | None:
        data = requests.get(f"{api}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        by_job = {target["labels"]["job"]: target for target in data}
        if {"bearerbridge-metrics", "bearerbridge-imap"} <= by_job.keys() and \
                all(target["health"] != "unknown" for target in by_job.values()):
            return by_job
        return None

    try:
        targets = wait_for(scraped, timeout=WAIT, interval=0.5, what="both targets to be scraped")
    except TimeoutError:
        pytest.fail(f"Prometheus did not scrape both targets within {WAIT}s:\n{log.read_text()[-3000:]}")

    good, bad = targets["bearerbridge-metrics"], targets["bearerbridge-imap"]
    assert good["health"] == "up", (good, log.read_text()[-3000:])
    assert good["lastError"] == ""
    assert bad["health"] == "down", bad
    assert "403" in bad["lastError"], bad

    def query(expression: str) -> list[dict]:
        body = requests.get(f"{api}/api/v1/query", params={"query": expression}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    assert [r["value"][1] for r in query('up{job="bearerbridge-metrics"}')] == ["1"]
    assert [r["value"][1] for r in query('up{job="bearerbridge-imap"}')] == ["0"]

    counter = 'bearerbridge_token_requests_total{grant_type="client_credentials",job="bearerbridge-metrics"}'
    result = wait_for(lambda: query(counter), timeout=WAIT, interval=0.5, what=f"{counter} in Prometheus")
    assert len(result) == 1, result
    assert float(result[0]["value"][1]) >= 1  # at least Prometheus's own token request
    # nothing was ever scraped through the imap job
    assert query('bearerbridge_token_requests_total{job="bearerbridge-imap"}') == []

"""The audit log of a real `twistd bearerbridge` and of the CLI beside it, in one file: a code
grant's events and the operator's changes land there, and a clean stop (SIGTERM) loses none."""

from __future__ import annotations

import getpass
import json
import signal
import stat
import threading
import time

import requests

from .support import Service, exchange_code, get_code, token_request

CB = "https://app.example/cb"


def test_a_code_grant_and_the_cli_land_in_one_file_and_a_clean_stop_loses_no_event(tmp_path):
    service = Service.start(tmp_path, extra='[audit]\nfile = "logs/audit.log"\n')  # relative to the config
    path = tmp_path / "logs" / "audit.log"
    refreshed: list[int] = []
    try:
        client = service.client("--redirect-uri", CB, "--scope", "imap")
        name, password = service.user()
        code, verifier = get_code(service, client, name, password)
        tokens = exchange_code(service, client, code, verifier).json()
        service.cli("token", "revoke", "--client", client["client_id"])
        tokens = exchange_code(service, client, *get_code(service, client, name, password)).json()

        def refresh_until_stopped() -> None:
            """Refresh as fast as one client can while the service is stopped under it."""
            refresh_token = tokens["refresh_token"]
            while True:
                try:
                    answer = token_request(service, {"grant_type": "refresh_token", "refresh_token": refresh_token},
                                           client)
                except requests.ConnectionError:
                    return
                if answer.status_code != 200:
                    return
                refreshed.append(answer.json()["expires_in"])
                refresh_token = answer.json()["refresh_token"]
        refresher = threading.Thread(target=refresh_until_stopped)
        refresher.start()
        deadline = time.monotonic() + 10
        while len(refreshed) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        service.stop()  # SIGTERM, while refreshes are in flight
    refresher.join(10)
    # A clean stop: twistd finishes its shutdown, then ends by the signal it was sent.
    assert service.process.returncode == -signal.SIGTERM and "Server Shut Down." in service.log()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    events = [json.loads(line) for line in path.read_text().splitlines()]
    ours = [e for e in events if e["event"] in ("admin", "consent", "token_issued", "token_refreshed")]
    assert [(e["event"], e.get("action")) for e in ours[:6]] == [
        ("admin", "client create"), ("admin", "user add"), ("consent", None), ("token_issued", None),
        ("admin", "token revoke"), ("token_issued", None)]  # the second consent was remembered
    assert ours[2]["user"] == name and ours[2]["address"] == "127.0.0.1"
    assert ours[3]["grant_type"] == "authorization_code" and ours[3]["client_id"] == client["client_id"]
    assert ours[4]["actor"] == getpass.getuser() and ours[4]["revoked"] == 1
    # Every refresh answered is in the file; one more may be, answered as the service stopped.
    recorded = [e for e in ours[6:] if e["event"] == "token_refreshed"]
    assert len(refreshed) >= 20 and len(refreshed) <= len(recorded) <= len(refreshed) + 1
    assert all(e["family"] == ours[5]["family"] for e in recorded)
    assert "[audit]" not in service.log()


def test_events_the_audit_log_cannot_write_are_counted_in_metrics_and_the_service_goes_on(tmp_path):
    """A full disk (here /dev/full): each token is still issued, and /metrics says how many events were lost."""
    service = Service.start(tmp_path, extra='[audit]\nfile = "/dev/full"\n')
    try:
        app = service.client("--grant", "client_credentials", "--scope", "metrics")
        issued = [token_request(service, {"grant_type": "client_credentials", "scope": "metrics"}, app)
                  for _ in range(3)]
        assert [r.status_code for r in issued] == [200, 200, 200]
        metrics = requests.get(f"{service.url}/metrics", timeout=10,
                               headers={"Authorization": f"Bearer {issued[-1].json()['access_token']}"})
        assert "bearerbridge_audit_lost 3.0" in metrics.text
        assert service.log().count("security events are being lost") == 1
    finally:
        service.stop()

"""A database that stops answering, through a real twistd: every request is answered within
`[database] deadline` (503, one log line, no traceback), /healthz says so, and the service
recovers when the database does. PostgreSQL is reached through a relay that can stop relaying,
as a stopped (SIGSTOPped) server looks from the client; SQLite's write lock is held by another
process."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time

import requests
from sqlalchemy.engine import make_url

from .support import Service, postgres_schema, token_request, wait_for

DEADLINE = 1.0
MARGIN = 2.0  # seconds beyond the deadline for an answer on a loaded 2-core machine


class FreezingRelay:
    """A TCP relay on loopback to (host, port) that holds every byte while frozen."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self._frozen.is_set():
                    time.sleep(0.01)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def issue(service: Service, client: dict) -> requests.Response:
    return token_request(service, {"grant_type": "client_credentials", "scope": "imap"}, client)


def assert_answered_within_the_deadline(service: Service, client: dict) -> None:
    answer, took = timed(lambda: issue(service, client))
    assert answer.status_code == 503 and answer.json()["error"] == "temporarily_unavailable", answer.text
    assert took < DEADLINE + MARGIN, took
    health, took = timed(lambda: requests.get(f"{service.url}/healthz", timeout=10))
    assert health.status_code == 503 and took < DEADLINE + MARGIN, (health.status_code, took)


def assert_recovers(service: Service, client: dict) -> None:
    wait_for(lambda: requests.get(f"{service.url}/healthz", timeout=10).status_code == 200,
             what="/healthz to say 200 again", timeout=DEADLINE + 10)
    assert issue(service, client).status_code == 200
    log = service.log()
    assert "answered 503: the database" in log and "Traceback" not in log


def test_a_stopped_postgresql_costs_each_request_the_deadline_not_more(tmp_path):
    with postgres_schema() as url:
        parsed = make_url(url)
        relay = FreezingRelay(parsed.host or "127.0.0.1", parsed.port or 5432)
        service = Service.start(tmp_path, database_url=parsed.set(host="127.0.0.1", port=relay.port)
                                .render_as_string(hide_password=False), deadline=DEADLINE)
        try:
            client = service.client("--grant", "client_credentials", "--scope", "imap")
            assert issue(service, client).status_code == 200
            relay.freeze()
            assert_answered_within_the_deadline(service, client)
            assert_answered_within_the_deadline(service, client)  # the next ones too, not queued behind
            relay.thaw()
            assert_recovers(service, client)
        finally:
            service.stop()
            relay.close()


def test_a_sqlite_write_lock_held_elsewhere_costs_each_request_the_deadline_not_more(tmp_path):
    service = Service.start(tmp_path, deadline=DEADLINE)
    try:
        client = service.client("--grant", "client_credentials", "--scope", "imap")
        assert issue(service, client).status_code == 200
        other = sqlite3.connect(tmp_path / "bearerbridge.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process (the CLI, say) holds the write lock
        try:
            assert_answered_within_the_deadline(service, client)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert_recovers(service, client)
    finally:
        service.stop()

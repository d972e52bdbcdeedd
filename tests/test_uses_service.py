"""When grants were last used, through a running `twistd bearerbridge`: a login on the Dovecot auth
socket and a request nginx forwards are written to `token_uses` at the latest when the service
stops (SIGTERM), with Dovecot's `rip` (the client's address as the mail server saw it) and the
address in X-Forwarded-For; a refused login is not."""

from __future__ import annotations

import requests
import sqlalchemy as sa

from bearerbridge.storage.schema import token_uses, tokens
from bearerbridge.storage.store import make_engine

from .support import Service, free_port
from .test_sasl_service import DovecotClient, oauthbearer

CONFIG = """
[sasl]
listen = ["tcp:{port}:interface=127.0.0.1"]
"""


def test_a_dovecot_login_and_a_forwarded_request_are_written_when_the_service_stops(tmp_path):
    port = free_port()
    service = Service.start(tmp_path, extra=CONFIG.format(port=port))
    try:
        name, _ = service.user()
        client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "smtp webdav:read")
        smtp = service.issue(name, client["client_id"], "smtp")
        dav = service.issue(name, client["client_id"], "webdav:read")
        dovecot = DovecotClient(("127.0.0.1", port))
        try:
            assert dovecot.auth("1", "OAUTHBEARER", "smtp", oauthbearer(name, smtp)) == f"OK\t1\tuser={name}"
            # no smtp scope: refused
            assert dovecot.auth("2", "OAUTHBEARER", "smtp", oauthbearer(name, dav)).startswith("CONT\t2\t")
        finally:
            dovecot.close()
        forwarded = requests.get(f"{service.url}/forward-auth", timeout=10, headers={
            "Authorization": f"Bearer {dav}", "X-Original-Method": "PROPFIND", "X-Original-URI": "/dav/",
            "X-Forwarded-For": "203.0.113.9"})  # from nginx on loopback, a trusted proxy by default
        assert forwarded.status_code == 200
    finally:
        service.stop()  # SIGTERM: what is noted is written before the pool stops
    assert "Main loop terminated." in service.log()  # a clean stop (twistd then exits by the signal it got)
    engine = make_engine(f"sqlite:///{tmp_path / 'bearerbridge.db'}")
    try:
        with engine.connect() as db:
            families = {row.scope: row.family for row in db.execute(sa.select(tokens.c.scope, tokens.c.family))}
            written = {(row.family, row.service, row.address) for row in db.execute(sa.select(token_uses))}
    finally:
        engine.dispose()
    assert written == {(families["smtp"], "smtp", "127.0.0.1"), (families["webdav:read"], "webdav", "203.0.113.9")}

"""What every response carries, Twisted's own pages included, and what is never served."""

from __future__ import annotations

import dataclasses

import pytest

from bearerbridge.config import Config

from ..fakes import Bridge, sqlite_store


@pytest.fixture
def bridge(tmp_path) -> Bridge:
    store = sqlite_store(tmp_path / "x.db")
    yield Bridge.over(store)
    store.engine.dispose()


def secured(answer) -> bool:
    return (answer.header("X-Frame-Options") == "DENY" and answer.header("X-Content-Type-Options") == "nosniff"
            and answer.header("Referrer-Policy") == "no-referrer"
            and "frame-ancestors 'none'" in (answer.header("Content-Security-Policy") or ""))


def test_twisteds_own_404_405_and_501_pages_carry_the_security_headers(bridge):
    browser = bridge.browser()
    for answer, code in ((browser.get("/no-such-page"), 404), (browser.get("/"), 404),
                         (browser.get("/token"), 405), (browser.request("PUT", "/authorize"), 501),
                         (browser.get("/static/"), 404), (browser.get("/healthz"), 200)):
        assert answer.code == code
        assert secured(answer), answer


def test_the_static_folder_lists_nothing(bridge):
    """(The stylesheet itself is served through a real socket: test_browser.py's pages use it.)"""
    for path in ("/static/", "/static"):
        answer = bridge.browser().get(path)
        assert answer.code in (302, 404) and b"style.css" not in answer.body, path


def test_hsts_only_under_an_https_issuer(tmp_path, bridge):
    assert bridge.browser().get("/healthz").header("Strict-Transport-Security") is None
    config = Config()
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, issuer="https://auth.example.org"))
    secure = Bridge.over(sqlite_store(tmp_path / "y.db"), config)
    for path in ("/healthz", "/no-such-page", "/authorize"):
        assert secure.browser().get(path).header("Strict-Transport-Security") == "max-age=31536000", path

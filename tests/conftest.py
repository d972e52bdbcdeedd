from __future__ import annotations

import pytest
import pytest_twisted

from .support import Service


@pytest.fixture(scope="session")
def service(tmp_path_factory) -> Service:
    """One bearerbridge for the session's HTTP tests; each test makes its own users and clients."""
    running = Service.start(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()


@pytest.fixture
def resource_server(service: Service) -> dict:
    """A confidential client that introspects tokens, as an IMAP or WebDAV server would."""
    return service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")


@pytest.fixture
def web_client(service: Service) -> dict:
    """A confidential web application using the code grant."""
    return service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap smtp")


@pytest.fixture
def native_client(service: Service) -> dict:
    """A public native application with a loopback redirect."""
    return service.client("--public", "--redirect-uri", "http://127.0.0.1/callback", "--scope", "imap smtp")


@pytest_twisted.async_yield_fixture
async def doveadm():
    """A fake doveadm HTTP API on loopback (tests/doveadm/fake.py) while the test runs; `.url` is its URL."""
    from .doveadm.fake import FakeDoveadm  # here: it imports the reactor, which pytest-twisted installs first

    fake = FakeDoveadm()
    fake.url = fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium (Debian's, through chromedriver), quit after the test."""
    from .test_browser import start_chromium  # here: only tests that drive a browser import Selenium

    driver = start_chromium(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()

"""The device authorization grant (RFC 8628) end to end over real HTTP, and its refusals."""

from __future__ import annotations

import time

import pytest
import requests

from .support import Service, form_fields, introspect

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@pytest.fixture
def tv(service):
    """A public client for a device with no browser."""
    return service.client("--public", "--grant", "device_code", "--grant", "refresh_token", "--scope", "imap smtp")


def start(service, client, scope="imap"):
    response = requests.post(f"{service.url}/device_authorization", data={"client_id": client["client_id"],
                                                                         "scope": scope})
    assert response.status_code == 200, response.text
    return response.json()


def poll(service, client, device_code):
    return requests.post(f"{service.url}/token", data={"grant_type": DEVICE_GRANT, "device_code": device_code,
                                                        "client_id": client["client_id"]})


def user_enters_code(service, browser, username, password, url, typed=None, decision="approve"):
    """The user's part: sign in on the verification page, type the code, decide."""
    page = browser.get(url)
    action, fields = form_fields(page.text)
    page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
    assert page.status_code == 200, page.text
    action, fields = form_fields(page.text)
    if typed is not None:
        fields["user_code"] = typed
    page = browser.post(service.url + action, data=fields)
    if page.status_code != 200 or fields.get("step") != "code" or "consent" not in page.text:
        return page
    action, fields = form_fields(page.text)
    return browser.post(service.url + action, data={**fields, "decision": decision})


def test_device_grant_end_to_end(service, tv, resource_server):
    username, password = service.user()
    started = start(service, tv)
    assert started["verification_uri"] == f"{service.url}/device"
    assert started["verification_uri_complete"].endswith(started["user_code"])
    assert started["expires_in"] == 900 and started["interval"] == 5
    assert len(started["user_code"]) == 9 and started["user_code"][4] == "-"

    assert poll(service, tv, started["device_code"]).json()["error"] == "authorization_pending"
    assert poll(service, tv, started["device_code"]).json()["error"] == "slow_down"  # polled within the interval

    with requests.Session() as browser:
        page = browser.get(started["verification_uri_complete"])
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
        action, fields = form_fields(page.text)
        assert fields["user_code"] == started["user_code"]  # pre-filled from verification_uri_complete
        page = browser.post(service.url + action, data=fields)
        assert tv["name"] in page.text and "Read and manage your mail (IMAP)" in page.text  # the consent page
        action, fields = form_fields(page.text)
        done = browser.post(service.url + action, data={**fields, "decision": "approve"})
        assert 'id="device-approved"' in done.text

    tokens = poll(service, tv, started["device_code"])
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    assert body["scope"] == "imap" and "refresh_token" in body
    assert introspect(service, resource_server, body["access_token"])["username"] == username
    again = poll(service, tv, started["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"  # a device code is good once


def test_the_code_can_be_typed_loosely(service, tv):
    username, password = service.user()
    started = start(service, tv)
    with requests.Session() as browser:
        loose = started["user_code"].lower().replace("-", " ")
        done = user_enters_code(service, browser, username, password, f"{service.url}/device", typed=loose)
    assert 'id="device-approved"' in done.text


def test_denied(service, tv):
    username, password = service.user()
    started = start(service, tv)
    with requests.Session() as browser:
        done = user_enters_code(service, browser, username, password, started["verification_uri_complete"],
                                decision="deny")
    assert 'id="device-denied"' in done.text
    assert poll(service, tv, started["device_code"]).json()["error"] == "access_denied"


@pytest.fixture(scope="module")
def own_service(tmp_path_factory):
    """A service of its own: blocking 127.0.0.1 on the shared one would block later tests."""
    # Wrong codes count as failed sign-ins ([throttle.sign_in]): here five, without delays, block.
    running = Service.start(tmp_path_factory.mktemp("guesses"),
                            extra="[throttle.sign_in]\nfree_failures = 5\naccount_block_after = 5\n")
    yield running
    running.stop()


def test_wrong_codes_are_refused_then_rate_limited(own_service):
    service = own_service
    tv = service.client("--public", "--grant", "device_code", "--scope", "imap")
    username, password = service.user()
    with requests.Session() as browser:
        page = user_enters_code(service, browser, username, password, f"{service.url}/device", typed="BCDF-GHJK")
        assert page.status_code == 400 and "not valid" in page.text
        for _ in range(4):  # five wrong codes in all are refused as wrong...
            action, fields = form_fields(page.text)
            page = browser.post(service.url + action, data={**fields, "user_code": "ZZZZ-ZZZZ"})
            assert page.status_code == 400
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "user_code": "ZZZZ-ZZZZ"})
        assert page.status_code == 429 and "Too many wrong codes" in page.text  # ...the sixth is not tried
        started = start(service, tv)  # even a right code waits now
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "user_code": started["user_code"]})
        assert page.status_code == 429


def test_refusals_at_the_device_endpoint(service, tv):
    response = requests.post(f"{service.url}/device_authorization", data={"client_id": tv["client_id"],
                                                                         "scope": "imap metrics"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_scope"
    web_app = service.client("--redirect-uri", "https://app.example/cb")  # not registered for the device grant
    response = requests.post(f"{service.url}/device_authorization", data={"client_id": web_app["client_id"]},
                             auth=(web_app["client_id"], web_app["client_secret"]))
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"
    response = requests.post(f"{service.url}/device_authorization", data={"client_id": "nobody"})
    assert response.json()["error"] == "invalid_client"  # 400: no Authorization header (RFC 6749 §5.2)
    assert poll(service, tv, "no-such-device-code").json()["error"] == "invalid_grant"


@pytest.fixture(scope="module")
def short_device(tmp_path_factory):
    running = Service.start(tmp_path_factory.mktemp("device"), extra="[tokens]\ndevice_ttl = 1\n")
    yield running
    running.stop()


def test_expired_device_code(short_device):
    service = short_device
    tv = service.client("--public", "--grant", "device_code", "--scope", "imap")
    username, password = service.user()
    started = start(service, tv)
    assert started["expires_in"] == 1
    time.sleep(1.1)
    assert poll(service, tv, started["device_code"]).json()["error"] == "expired_token"
    with requests.Session() as browser:
        page = user_enters_code(service, browser, username, password, started["verification_uri_complete"])
    assert page.status_code == 400 and "expired" in page.text

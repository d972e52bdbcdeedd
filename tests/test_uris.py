"""Redirect URIs that a browser and a parser could read two ways are refused; loopback ports are free."""

from __future__ import annotations

import pytest

from bearerbridge.storage.models import Client
from bearerbridge.uris import is_loopback_host, loopback_redirect_without_port, redirect_uri_problem

NATIVE = Client("native", "Native", ("http://127.0.0.1/cb", "http://[::1]/cb"), "imap", ("authorization_code",), True)
WEB = Client("web", "Web", ("https://app.example/cb",), "imap", ("authorization_code",), False)

# Each of these reads as a loopback URI to Python's urlsplit; a browser (WHATWG URL rules) sends
# the first to evil.example. The others hide the same characters, or others as ambiguous.
TWO_READINGS = [
    "http://evil.example\\@127.0.0.1:1234/cb",
    "http://evil.example%5C@127.0.0.1:1234/cb",
    "http://evil.example%5c@127.0.0.1:1234/cb",
    "http://evil.example@127.0.0.1:1234/cb",
    "http://evil.example%40127.0.0.1:1234/cb",
    "http://evil.example\t@127.0.0.1:1234/cb",
    "http://evil.example%09@127.0.0.1:1234/cb",
    "http://127.0.0.1:1234/cb\\..\\x",
    "http://127.0.0.1:1234/c b",
    "http://127.0.0.1:1234/c%20b",
    "http://127.0.0.1:1234/cb\n",
    "http://127.0.0.1:1234/cb%0a",
    "http://127.0.0.1:1234/cb%00",
    "http://127.0.0.1:1234/cb%7F",
    "http://127.0.0.1:1234/c\u00e9",
    'http://127.0.0.1:1234/cb"',
    "http://127.0.0.1:1234/cb<script>",
]


@pytest.mark.parametrize("uri", TWO_READINGS)
def test_a_uri_with_two_readings_is_refused_everywhere(uri):
    assert redirect_uri_problem(uri) is not None
    assert not NATIVE.check_redirect_uri(uri)


@pytest.mark.parametrize("uri, why", [
    ("/cb", "absolute"),
    ("https://app.example/cb#frag", "fragment"),
    ("https://app.example/cb#", "fragment"),
    ("https:///cb", "absolute"),
    ("http://app.example/cb", "plain http"),
    ("", "characters"),
])
def test_a_redirect_uri_must_be_absolute_without_fragment_and_https_off_loopback(uri, why):
    assert why in redirect_uri_problem(uri)


@pytest.mark.parametrize("uri", [
    "https://app.example/cb", "https://app.example:8443/cb?x=1&y=a%2Fb", "http://127.0.0.1:8000/cb",
    "http://[::1]:8000/cb", "http://localhost:8000/cb", "com.example.app:/oauth2redirect", "https://a.example/~me/cb",
])
def test_ordinary_redirect_uris_pass(uri):
    assert redirect_uri_problem(uri) is None


def test_the_port_of_a_loopback_redirect_is_all_that_may_differ():
    assert loopback_redirect_without_port("http://127.0.0.1:51234/cb?x=1") == "http://127.0.0.1/cb?x=1"
    assert loopback_redirect_without_port("http://[::1]:1/cb") == "http://[::1]/cb"
    assert loopback_redirect_without_port("http://127.0.0.1/cb") == "http://127.0.0.1/cb"
    for other in ("http://localhost:1/cb", "https://127.0.0.1:1/cb", "http://127.0.0.2:1/cb",
                  "http://evil.example\\@127.0.0.1:1/cb", "http://127.0.0.1.evil.example/cb"):
        assert loopback_redirect_without_port(other) is None, other


def test_a_public_client_may_use_any_port_of_its_loopback_uri_and_nothing_else():
    assert NATIVE.check_redirect_uri("http://127.0.0.1:50000/cb")
    assert NATIVE.check_redirect_uri("http://[::1]:50000/cb")
    assert NATIVE.check_redirect_uri("http://127.0.0.1/cb")
    for other in ("http://127.0.0.1:50000/cb/", "http://127.0.0.1:50000/CB", "http://127.0.0.1:50000/cb?x",
                  "http://localhost:50000/cb", "http://127.0.0.1:50000/cb#"):
        assert not NATIVE.check_redirect_uri(other), other


def test_a_confidential_client_gets_exact_matches_only():
    assert WEB.check_redirect_uri("https://app.example/cb")
    for other in ("https://app.example/cb/", "https://APP.example/cb", "https://app.example:443/cb",
                  "https://app.example/cb?", "https://app.example/%63b"):
        assert not WEB.check_redirect_uri(other), other
    confidential_loopback = Client("c", "C", ("http://127.0.0.1/cb",), "imap", ("authorization_code",), False)
    assert not confidential_loopback.check_redirect_uri("http://127.0.0.1:5000/cb")


def test_loopback_hosts():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback_host(h) for h in ("127.0.0.1.evil.example", "LOCALHOST.evil", "10.0.0.1", None, ""))

"""What every response carries, Twisted's own pages included, and what is never served."""

from __future__ import annotations

import dataclasses
import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from bearerbridge.config import Config
from bearerbridge.web.site import BODY_DEADLINE, HEAD_DEADLINE, MAX_BODY, BridgeSite

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


def test_every_error_page_ours_or_twisteds_carries_the_security_headers(bridge):
    browser = bridge.browser()
    for answer, code in ((browser.get("/no-such-page"), 404), (browser.get("/"), 200),
                         (browser.get("/token"), 405), (browser.request("PUT", "/authorize"), 501),
                         (browser.get("/static/"), 404), (browser.get("/healthz"), 200)):
        assert answer.code == code
        assert secured(answer), answer


def test_an_address_that_names_nothing_gets_the_sites_own_page(bridge):
    for path in ("/no-such-page", "/favicon.ico", "/no/such/page", "/index.html"):
        answer = bridge.browser().get(path)
        assert answer.code == 404 and answer.header("Content-Type") == "text/html; charset=utf-8", path
        assert b"There is no page at this address." in answer.body and b"not_found" in answer.body, path


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


# -- reading a request: the transport level of BridgeSite, over a StringTransport ---------------


class Recorder(Resource):
    """A leaf that keeps the bodies it was given; `hold` leaves the answer for the test to finish."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.held: list[Request] = []
        self.hold = hold

    def render(self, request: Request):
        self.bodies.append(request.content.read())
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"done"


class Connection:
    def __init__(self, hold: bool = False) -> None:
        self.clock = Clock()
        self.resource = Recorder(hold)
        self.protocol = BridgeSite(self.resource, reactor=self.clock).buildProtocol(
            IPv4Address("TCP", "203.0.113.9", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        written = self.transport.value()
        self.transport.clear()
        return written


def head(method: str = "POST", **headers: str) -> bytes:
    lines = [f"{method} /x HTTP/1.1", "Host: auth.example"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def refused(written: bytes, status: bytes) -> dict:
    status_line, _, rest = written.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 " + status), written[:200]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers and b"X-Frame-Options: DENY" in headers
    return json.loads(body)


@pytest.mark.parametrize("length", [MAX_BODY + 1, 256 * 1024 * 1024, 1024 ** 4])
def test_a_body_announced_longer_than_the_limit_is_refused_at_once(length):
    connection = Connection()
    written = connection.send(head(Content_Length=str(length), Content_Type="application/x-www-form-urlencoded"))
    assert refused(written, b"413")["error"] == "invalid_request"
    assert connection.transport.disconnecting and connection.resource.bodies == []
    connection.send(b"a" * 1000)  # whatever was already on its way is ignored
    assert connection.transport.value() == b"" and connection.resource.bodies == []


def test_a_client_expecting_100_continue_gets_413_and_never_continue():
    connection = Connection()
    written = connection.send(head(Content_Length=str(1024 ** 4), Expect="100-continue"))
    assert b"100 Continue" not in written
    refused(written, b"413")


def test_a_chunked_body_is_counted_as_it_arrives_and_refused_past_the_limit():
    connection = Connection()
    assert connection.send(head(Transfer_Encoding="chunked")) == b""
    for _ in range(MAX_BODY // 8192):
        assert connection.send(chunk(b"a" * 8192)) == b""  # exactly the limit so far: still read
    refused(connection.send(chunk(b"a")), b"413")
    assert connection.transport.disconnecting
    connection.send(chunk(b"a") + b"0\r\n\r\n")
    assert connection.resource.bodies == []


def test_a_chunked_body_over_the_limit_in_one_read_is_never_served():
    connection = Connection()
    written = connection.send(head(Transfer_Encoding="chunked") + chunk(b"a" * (MAX_BODY + 1)) + chunk(b"b")
                              + b"0\r\n\r\n")
    refused(written, b"413")
    assert connection.resource.bodies == []


@pytest.mark.parametrize("encoding", ["length", "chunked"])
def test_a_body_at_the_limit_is_read_into_memory_and_served(encoding):
    connection = Connection()
    body = b"a" * MAX_BODY
    if encoding == "length":
        written = connection.send(head(Content_Length=str(len(body))) + body)
    else:
        written = connection.send(head(Transfer_Encoding="chunked") + chunk(body[:100]) + chunk(body[100:])
                                  + b"0\r\n\r\n")
    assert written.startswith(b"HTTP/1.1 200 OK") and connection.resource.bodies == [body]


def test_a_request_head_trickled_byte_by_byte_is_cut_off_at_the_head_deadline():
    connection = Connection()
    trickle = iter(head(method="GET", Accept="*/*"))
    elapsed = 0.0
    while elapsed + 1 < HEAD_DEADLINE:  # a byte a second would have kept Twisted's idle timeout at bay for ever
        assert connection.send(bytes([next(trickle)])) == b""
        connection.clock.advance(1)
        elapsed += 1
    connection.clock.advance(HEAD_DEADLINE - elapsed)
    assert refused(connection.transport.value(), b"408")["error"] == "invalid_request"
    assert connection.transport.disconnecting and connection.resource.bodies == []


def test_a_slow_body_is_cut_off_at_the_body_deadline():
    connection = Connection()
    connection.clock.advance(HEAD_DEADLINE - 1)
    connection.send(head(Content_Length="100"))  # the head in time: its deadline is met
    connection.send(b"a" * 99)
    connection.clock.advance(BODY_DEADLINE - 0.1)
    assert not connection.transport.disconnecting
    connection.clock.advance(0.2)
    refused(connection.transport.value(), b"408")


def test_an_idle_connection_and_a_request_being_answered_are_not_subject_to_the_deadlines():
    connection = Connection(hold=True)
    connection.clock.advance(HEAD_DEADLINE * 2)  # no byte yet: only Twisted's idle timeout applies
    assert not connection.transport.disconnecting
    connection.send(head(method="GET"))
    connection.send(head(method="GET")[:10])  # pipelined: buffered while the first is answered
    connection.clock.advance(HEAD_DEADLINE + BODY_DEADLINE + 60)  # a slow answer (a slow database)
    assert not connection.transport.disconnecting and connection.transport.value() == b""
    request = connection.resource.held.pop()
    request.write(b"late")
    request.finish()
    assert connection.transport.value().startswith(b"HTTP/1.1 200 OK")
    connection.transport.clear()
    connection.clock.advance(HEAD_DEADLINE)  # the second request's head, begun before, is late now
    refused(connection.transport.value(), b"408")


def test_deadlines_end_with_the_connection():
    connection = Connection()
    connection.send(b"GET /")
    connection.protocol.connectionLost(Failure(ConnectionDone()))
    assert connection.clock.getDelayedCalls() == []


def test_the_root_says_what_the_site_is_for_a_person_who_comes_by(bridge):
    answer = bridge.browser().get("/")
    assert answer.code == 200 and answer.header("Content-Type") == "text/html; charset=utf-8"
    assert b'id="landing"' in answer.body and b'href="/logout"' in answer.body
    assert bridge.browser().request("POST", "/").code == 405

"""An IMAP server offering OAUTHBEARER and XOAUTH2 that checks tokens by RFC 7662 introspection.

Run ``python examples/imap_server.py URL CLIENT_ID CLIENT_SECRET``, URL being bearerbridge's
``/introspect``. It listens on 127.0.0.1:1143 without TLS, which a real server needs.
"""

import sys

import treq
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, protocol, task
from twisted.mail import imap4
from zope.interface import implementer

from bearerbridge.sasl.cred import BearerChecker, BearerIMAP4Server, Validate, bearer_challengers
from bearerbridge.sasl.mechanisms import Bearer
from bearerbridge.sasl.verdict import Verdict


def introspection_validate(url: str, client_id: str, client_secret: str, service_scope: str,
                           http=treq) -> Validate:
    """Ask the RFC 7662 §2.1 endpoint about each token and map the §2.2 answer to a Verdict."""
    async def ask(bearer: Bearer) -> Verdict:
        form, auth = {"token": bearer.token}, (client_id, client_secret)  # client_secret_basic
        response = await http.post(url, data=form, auth=auth)
        if response.code != 200:
            return Verdict(ok=False, temporary=True, reason=f"introspection said {response.code}")
        claims = await response.json()
        if not claims.get("active"):
            return Verdict(ok=False, reason="inactive")
        username, email = claims.get("username"), claims.get("email")
        if not username:  # a client_credentials token names no one: no mailbox
            return Verdict(ok=False, reason="no_user")
        named = bearer.identity
        if named is not None and named != username and not (email and named.casefold() == email.casefold()):
            return Verdict(ok=False, reason="identity_mismatch")  # an address in any case, as judge() allows
        if service_scope not in claims.get("scope", "").split():
            return Verdict(ok=False, status="insufficient_scope", scope=service_scope)
        return Verdict(ok=True, username=username)
    return lambda bearer, _service: defer.Deferred.fromCoroutine(ask(bearer))  # one scope


@implementer(IRealm)
class MemoryRealm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        return imap4.IAccount, imap4.MemoryAccount(avatar_id), lambda: None


async def main(reactor, url: str, client_id: str, client_secret: str) -> None:
    checker = BearerChecker(introspection_validate(url, client_id, client_secret, "imap"))
    portal = Portal(MemoryRealm(), [checker])
    def build() -> BearerIMAP4Server:
        server = BearerIMAP4Server(chal=bearer_challengers("imap"))
        server.portal = portal
        return server

    endpoint = endpoints.TCP4ServerEndpoint(reactor, 1143, interface="127.0.0.1")
    await endpoint.listen(protocol.Factory.forProtocol(build))
    await defer.Deferred()  # serve until interrupted


if __name__ == "__main__":
    task.react(main, sys.argv[1:])

"""`bearerbridge-token`: fresh access tokens for mail clients, rclone, msmtp, mbsync and aerc.

    bearerbridge-token login --issuer URL --client-id ID [--client-secret S] [--scope "a b"]
                             [--profile NAME] [--device | --browser] [--ca-file PEM] [--port N]
    bearerbridge-token print  [--profile NAME] [--max-age SECONDS]    # the access token alone on stdout
    bearerbridge-token status [--profile NAME]    # never shows a token
    bearerbridge-token logout [--profile NAME] [--no-revoke]

`login` discovers the server (RFC 8414) and runs the device grant (RFC 8628) or the code grant
with PKCE and a loopback redirect (RFC 7636, RFC 8252 §7.3). `print` refreshes first (RFC 6749 §6)
when the access token expires within a minute or is older than `--max-age` (300 s: a login revoked
at the server is noticed at the first `print` after that, which exits 3), and saves the rotated
refresh token under an exclusive lock, so concurrent callers (rclone runs the command again after
every 401) never replay one. Exit status: 0, 1 on a failure that may pass (network, server), 3
when only a new `login` can help, 130 when interrupted; stdout is empty unless `print` succeeds.

This module is the I/O: argparse, treq, the loopback listener. The decisions are in
`client.protocol` and the state in `client.profile`. treq runs on an `Agent` whose
`BrowserLikePolicyForHTTPS` verifies the certificate chain and the host name (service-identity),
trusting the platform's roots or, with `--ca-file`, only the certificates in that PEM file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import secrets
import sys
import threading
import time
import traceback
import webbrowser
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.web.resource import Resource
from twisted.web.server import Site

from bearerbridge.client.profile import (
    APP,
    MAX_AGE,
    DamagedProfile,
    Profile,
    ProfileFile,
    ProtocolError,
    apply_token_response,
    check_profile_name,
    config_dir,
    needs_refresh,
)
from bearerbridge.client.protocol import (
    DEVICE_GRANT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOGIN_NEEDED,
    HelperError,
    LoginNeeded,
    Refused,
    StrayCallback,
    Unreachable,
    authorize_url,
    check_callback,
    check_issuer,
    check_metadata,
    choose_flow,
    client_auth,
    discovery_urls,
    graphical,
    login_command,
    parse_device_response,
    pkce_pair,
    poll_decision,
    status_lines,
    terminal_safe,
)

if TYPE_CHECKING:
    # What task.react hands every command: the global reactor, whose type is Twisted's name for
    # the interfaces all its reactors implement (listenTCP, seconds, addSystemEventTrigger...).
    from twisted.internet import _IReactorCommon as Reactor
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # what trustRootFromCertificates gives
    from twisted.web.iweb import IRequest

    Command = Callable[[Reactor, argparse.Namespace, Mapping[str, str]], Awaitable[None]]

HTTP_TIMEOUT = 30  # seconds for a whole request, body included
LOGIN_TIMEOUT = 600  # seconds to wait for the browser (the server's codes live 10 minutes)
DEAD_LOGIN = ("invalid_grant", "invalid_client", "unauthorized_client")  # RFC 6749 §5.2


def note(message: str) -> None:
    print(f"{APP}: {message}", file=sys.stderr, flush=True)


# -- HTTP ------------------------------------------------------------------------------------

def trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """Every certificate in the PEM file, as the only roots to trust."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as error:
        raise HelperError(f"cannot read the CA file {ca_file}: {error.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if not blocks:
        raise HelperError(f"the CA file {ca_file} holds no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def describe_failure(error: BaseException) -> str:
    """Why a request got no answer, in a few words."""
    from OpenSSL.SSL import Error as TLSError
    from service_identity import VerificationError
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, RequestTransmissionFailed
    if reasons:
        error = reasons[0].value
    if isinstance(error, VerificationError):
        return "the TLS handshake failed: the server's certificate is not for this host name"
    if isinstance(error, TLSError):
        return "the TLS handshake failed: the server's certificate is not trusted (--ca-file trusts a private CA)"
    if isinstance(error, (defer.CancelledError, defer.TimeoutError)):
        return f"no answer within {HTTP_TIMEOUT} s"
    return terminal_safe(error) or type(error).__name__


class Http:
    """Form POSTs and GETs answered with JSON, over treq."""

    def __init__(self, reactor: Reactor, ca_file: str | None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
        policy = BrowserLikePolicyForHTTPS(trust_root(ca_file)) if ca_file else BrowserLikePolicyForHTTPS()
        agent = Agent(reactor, contextFactory=policy, pool=HTTPConnectionPool(reactor, persistent=False))
        self._reactor, self._client = reactor, HTTPClient(agent)

    async def _exchange(self, method: str, url: str, form: dict[str, str] | None) -> tuple[int, bytes]:
        headers: dict[bytes | str, list[bytes | str]] = {"Accept": ["application/json"]}
        response = await self._client.request(method, url, data=form, allow_redirects=False, headers=headers)
        return response.code, await response.content()

    async def call(self, method: str, url: str, form: dict[str, str] | None = None) -> tuple[int, object]:
        """The status and the JSON body (None if it is not JSON); Unreachable without an answer."""
        try:
            status, body = await defer.ensureDeferred(self._exchange(method, url, form)).addTimeout(
                HTTP_TIMEOUT, self._reactor)
        except Exception as error:
            raise Unreachable(f"could not reach {terminal_safe(url)}: {describe_failure(error)}") from None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    async def token(self, profile: Profile, grant: dict[str, str]) -> object:
        """POST to the token endpoint (RFC 6749 §3.2): the 200 reply, else Refused."""
        status, body = await self.call("POST", profile.token_endpoint, {**client_auth(profile), **grant})
        if status != 200:
            raise Refused("the token endpoint", status, body)
        return body


async def discover(http: Http, issuer: str) -> object:
    """The RFC 8414 metadata, else the OpenID Connect Discovery document."""
    urls = discovery_urls(issuer)
    for url in urls:
        status, body = await http.call("GET", url)
        if status == 200:
            return body
    raise HelperError(f"found no server metadata at {' or '.join(urls)}")


async def revoke(http: Http, profile: Profile) -> None:
    """RFC 7009 §2.1: revoke the refresh token, which ends the whole grant (else the access token)."""
    token, hint = ((profile.refresh_token, "refresh_token") if profile.refresh_token
                   else (profile.access_token, "access_token"))
    if token is None:
        return
    if not profile.revocation_endpoint:
        raise HelperError("the server has no revocation_endpoint; `logout --no-revoke` forgets the login anyway")
    status, body = await http.call("POST", profile.revocation_endpoint,
                                   {"token": token, "token_type_hint": hint, **client_auth(profile)})
    if status != 200:
        raise Refused("the revocation endpoint", status, body)


# -- login flows -----------------------------------------------------------------------------

class CallbackPage(Resource):
    """The loopback redirect's target: hands the first answer carrying our `state` to `received`."""

    isLeaf = True

    def __init__(self, check: Callable[[dict[str, str]], str], received: defer.Deferred[str]) -> None:
        super().__init__()
        self.check, self.received = check, received

    def render_GET(self, request: IRequest) -> bytes:
        for name, value in ((b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store"),
                            (b"Referrer-Policy", b"no-referrer"), (b"X-Content-Type-Options", b"nosniff")):
            request.setHeader(name, value)
        if request.path != b"/callback" or self.received.called:
            request.setResponseCode(404)
            return b"Not found.\n"
        params = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        try:
            code = self.check(params)
        except StrayCallback:
            request.setResponseCode(400)
            return f"This is not the answer {APP} is waiting for.\n".encode()
        except HelperError as error:
            self.received.errback(error)
            return f"{APP}: {error}.\n".encode()
        self.received.callback(code)
        return f"{APP} received the authorization; you may close this window.\n".encode()


def open_browser(url: str) -> None:
    """Try the user's browser (RFC 8252 §4.1) off the reactor thread, as some browsers block."""
    def run() -> None:
        with contextlib.suppress(Exception):
            webbrowser.open(url)
    threading.Thread(target=run, daemon=True).start()


async def browser_login(reactor: Reactor, http: Http, base: Profile, metadata: dict[str, Any], scope: str | None,
                        port: int, environ: Mapping[str, str]) -> Profile:
    """The code grant with PKCE S256 and a loopback redirect (RFC 8252 §7.3, RFC 7636)."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(32)
    iss_required = metadata.get("authorization_response_iss_parameter_supported") is True
    received: defer.Deferred[str] = defer.Deferred()
    site = Site(CallbackPage(lambda params: check_callback(params, state, base.issuer, iss_required), received))
    site.noisy = False
    try:
        # Twisted types listenTCP's factory as a ServerFactory of its default protocol type, which no
        # web Site is (Factory is invariant in its protocol).
        listening = reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[arg-type]
    except CannotListenError as error:
        raise HelperError(f"cannot listen on 127.0.0.1:{port}: {error.socketError}") from None
    address = listening.getHost()
    assert isinstance(address, IPv4Address)  # a TCP port on 127.0.0.1
    redirect_uri = f"http://127.0.0.1:{address.port}/callback"
    url = authorize_url(metadata["authorization_endpoint"], base.client_id, redirect_uri, scope, state, challenge)
    note("to sign in and allow access, open this address in a browser on this machine:")
    print(url, file=sys.stderr, flush=True)
    if graphical(environ) or environ.get("BROWSER"):
        open_browser(url)
    try:
        code = await received.addTimeout(LOGIN_TIMEOUT, reactor)
    except defer.TimeoutError:
        raise HelperError(f"no answer from the browser within {LOGIN_TIMEOUT // 60} minutes") from None
    except HelperError:
        await task.deferLater(reactor, 0.2)  # the reactor writes the browser's page before we exit
        raise
    finally:
        stopped = listening.stopListening()
        if stopped is not None:  # None if the port was closed already (not a Deferred to await)
            await stopped
    requested_at = time.time()
    body = await http.token(base, {"grant_type": "authorization_code", "code": code,
                                   "redirect_uri": redirect_uri, "code_verifier": verifier})
    return apply_token_response(base, body, requested_at, scope)


async def device_login(reactor: Reactor, http: Http, base: Profile, metadata: dict[str, Any], scope: str | None
                       ) -> Profile:
    """RFC 8628 §3.1-§3.5: get a user code, show it, poll the token endpoint until an answer."""
    status, body = await http.call("POST", metadata["device_authorization_endpoint"],
                                   {**client_auth(base), **({"scope": scope} if scope else {})})
    if status != 200:
        raise Refused("the device authorization endpoint", status, body)
    grant = parse_device_response(body)
    note(f"to sign in and allow access, visit {terminal_safe(grant.verification_uri)}")
    note(f"and enter the code {terminal_safe(grant.user_code)}")
    if grant.verification_uri_complete:
        note(f"or open {terminal_safe(grant.verification_uri_complete)}")
    note("waiting for the approval...")
    deadline, interval = reactor.seconds() + grant.expires_in, grant.interval
    while True:
        await task.deferLater(reactor, interval)
        if reactor.seconds() >= deadline:
            raise HelperError("the code expired before anyone approved it; run login again")
        requested_at = time.time()
        try:
            body = await http.token(base, {"grant_type": DEVICE_GRANT, "device_code": grant.device_code})
        except Unreachable:
            interval *= 2  # §3.5: back off when the server does not answer
            continue
        except Refused as refusal:
            interval = poll_decision(refusal.error, interval)
            continue
        return apply_token_response(base, body, requested_at, scope)


async def refreshed(reactor: Reactor, store: ProfileFile, profile: Profile) -> Profile:
    """RFC 6749 §6. Saves at once, under the caller's lock: the old refresh token is dead now."""
    hint = login_command(store.name, profile)
    if profile.refresh_token is None:
        raise LoginNeeded(f"the access token has expired and there is no refresh token; run: {hint}")
    requested_at = time.time()
    try:
        body = await Http(reactor, profile.ca_file).token(
            profile, {"grant_type": "refresh_token", "refresh_token": profile.refresh_token})
    except Refused as refusal:
        if refusal.error not in DEAD_LOGIN:
            raise
        store.save(profile.without_tokens())
        raise LoginNeeded(f"the login has expired or was revoked; run: {hint}") from None
    updated = apply_token_response(profile, body, requested_at)
    store.save(updated)
    return updated


# -- commands --------------------------------------------------------------------------------

async def cmd_login(reactor: Reactor, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    store = ProfileFile(config_dir(environ), args.profile)
    issuer = check_issuer(args.issuer)
    ca_file = os.path.abspath(args.ca_file) if args.ca_file else None
    http = Http(reactor, ca_file)
    document = await discover(http, issuer)
    flow = choose_flow(args.flow, document if isinstance(document, dict) else {}, environ)
    metadata = check_metadata(issuer, document, flow)
    base = Profile(issuer=metadata["issuer"], client_id=args.client_id, token_endpoint=metadata["token_endpoint"],
                   revocation_endpoint=metadata.get("revocation_endpoint"), client_secret=args.client_secret,
                   ca_file=ca_file)
    if flow == "device":
        profile = await device_login(reactor, http, base, metadata, args.scope)
    else:
        profile = await browser_login(reactor, http, base, metadata, args.scope, args.port, environ)
    previous = None
    async with store.locked(functools.partial(task.deferLater, reactor)):
        with contextlib.suppress(DamagedProfile):
            previous = store.load()
        store.save(profile)
    note(f"logged in as client {args.client_id} with scope {profile.scope or '-'}; "
         f"`{APP} print{'' if args.profile == 'default' else ' --profile ' + args.profile}` prints a token")
    if previous is not None and previous.refresh_token and previous.refresh_token != profile.refresh_token:
        try:  # the login this one replaces would otherwise stay valid at the server
            await revoke(Http(reactor, previous.ca_file), previous)
        except HelperError as error:
            note(f"could not revoke the login this one replaces: {error}")


async def cmd_print(reactor: Reactor, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    store = ProfileFile(config_dir(environ), args.profile)
    missing = LoginNeeded(f"no login under profile {args.profile!r}; run: {login_command(args.profile, None)}")
    if not store.path.exists():  # no need to create the directory for the lock
        raise missing
    async with store.locked(functools.partial(task.deferLater, reactor)):
        profile = store.load()
        if profile is None:
            raise missing
        if needs_refresh(profile, time.time(), max_age=args.max_age):
            profile = await refreshed(reactor, store, profile)
    sys.stdout.write(f"{profile.access_token}\n")
    sys.stdout.flush()


async def cmd_status(reactor: Reactor, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    profile = ProfileFile(config_dir(environ), args.profile).load()  # whole files only: no lock needed
    if profile is None:
        raise LoginNeeded(f"no login under profile {args.profile!r}; run: {login_command(args.profile, None)}")
    print("\n".join(status_lines(args.profile, profile, time.time())))


async def cmd_logout(reactor: Reactor, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    store = ProfileFile(config_dir(environ), args.profile)
    async with store.locked(functools.partial(task.deferLater, reactor)):
        try:
            profile = store.load()
        except DamagedProfile:
            if not args.no_revoke:
                raise
            profile = None
            store.delete()
        if profile is None:
            note(f"no login under profile {args.profile!r}")
            return
        if not args.no_revoke:
            await revoke(Http(reactor, profile.ca_file), profile)
        store.delete()
    note("logged out: " + ("the profile is deleted (the server was not told)" if args.no_revoke
                           else "the server revoked the tokens and the profile is deleted"))


# -- entry point -----------------------------------------------------------------------------

def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds (0 or more)")
    return seconds


def _profile_name(value: str) -> str:
    try:
        return check_profile_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=APP, description="Fresh OAuth 2.0 access tokens for mail, chat and "
                                  "file clients (msmtp passwordeval, mbsync PassCmd, rclone bearer_token_command).",
                                  epilog=f"Exit status: 0 done, {EXIT_FAILED} refused or failed, "
                                  f"{EXIT_LOGIN_NEEDED} log in again, {EXIT_INTERRUPTED} interrupted.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Command, help: str, more: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help + more)
        sub.set_defaults(run=run)
        sub.add_argument("--profile", default="default", type=_profile_name,
                         help="which login (default: default), stored in $XDG_CONFIG_HOME/bearerbridge-token/")
        return sub

    p = command("login", cmd_login, "log in at an authorization server and store the tokens")
    p.add_argument("--issuer", required=True, help="the server's issuer URL, e.g. https://auth.example.org")
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", help="for a confidential client (sent with client_secret_post; kept in "
                   "the profile in plain text, and visible in ps while this runs: prefer a public client)")
    p.add_argument("--scope", help='space-separated scopes, e.g. "imap smtp" (default: the client\'s)')
    flow = p.add_mutually_exclusive_group()
    flow.add_argument("--device", dest="flow", action="store_const", const="device",
                      help="show a code to enter on any device (RFC 8628); the default without a display")
    flow.add_argument("--browser", dest="flow", action="store_const", const="browser",
                      help="sign in with a browser on this machine (RFC 8252)")
    p.add_argument("--ca-file", help="trust only the CA certificates in this PEM file (remembered)")
    p.add_argument("--port", type=int, default=0,
                   help="loopback port for --browser (default: any free one; unused with --device)")
    p = command("print", cmd_print, "print a valid access token on stdout, refreshing it first if needed",
                ": when it expires within a minute, or is older than --max-age. The refresh asks the server "
                "whether the login still stands, so a login revoked there is noticed at the first print after "
                f"that bound (by default {MAX_AGE} s), which exits {EXIT_LOGIN_NEEDED} and says to log in again.")
    p.add_argument("--max-age", type=_seconds, default=MAX_AGE, metavar="SECONDS",
                   help=f"refresh an access token older than this, to learn whether the login still stands "
                   f"(default: {MAX_AGE}; 0 asks the server at every print)")
    command("status", cmd_status, "describe the stored login, without showing its tokens")
    p = command("logout", cmd_logout, "revoke the login at the server and delete it")
    p.add_argument("--no-revoke", action="store_true", help="only delete the local profile")
    return top


async def _run(reactor: Reactor, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Run one command; map its errors to a stderr line and an exit status (task.react's SystemExit)."""
    command = defer.ensureDeferred(args.run(reactor, args, environ))

    def interrupt() -> defer.Deferred[None] | None:  # Ctrl-C or SIGTERM: unwind (and unlock) before exiting
        if command.called:
            return None
        ended: defer.Deferred[None] = defer.Deferred()
        command.addBoth(lambda _: ended.callback(None))
        command.cancel()
        return ended

    reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    try:
        await command
    except defer.CancelledError:
        note("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except HelperError as error:
        note(str(error))
        raise SystemExit(error.exit_code) from None
    except DamagedProfile as error:
        note(str(error))
        raise SystemExit(EXIT_LOGIN_NEEDED) from None
    except (ProtocolError, OSError) as error:
        note(str(error))
        raise SystemExit(EXIT_FAILED) from None
    except Exception as error:  # the details might quote a token: say only what and where
        where = traceback.extract_tb(error.__traceback__)[-1]
        note(f"unexpected {type(error).__name__} at {os.path.basename(where.filename)}:{where.lineno}")
        raise SystemExit(EXIT_FAILED) from None


def main(argv: list[str] | None = None) -> None:
    """The console script: parse, then run the command on the reactor."""
    args = parser().parse_args(argv)
    task.react(_run, (args, os.environ))

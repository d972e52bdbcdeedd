"""kill -9 of a busy twistd (issue 10): every answer the clients got stays true after a restart.

Four client threads run the grants against a real `twistd bearerbridge` without pause: code
grants (/authorize, then the exchange), client credentials, refreshes, revocations. After a few
hundred answers, at a random moment, twistd gets SIGKILL. Each thread kept a record of what the
answers it received said; a request the kill cut has no answer, so it claims nothing, and what it
would have changed is left "either way". The database is then read with the store as the killed
process left it, and the service is started again on it and asked over HTTP:

- none lost: every token an answer gave is in the database and active, unless we revoked it
  later; a refresh answered 200 rotated the refresh token it spent, which is refused now, and
  its new one works; a code exchanged with 200 is used, and exchanging it again is refused;
- none resurrected: the tokens of a grant whose revocation answered 200 are revoked (RFC 7009,
  `oauth.endpoints.Revocation`: the whole family), and its refresh token is refused.

Run on an SQLite file and on PostgreSQL (`BEARERBRIDGE_TEST_DATABASE_URL`).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from bearerbridge import config as configuration
from bearerbridge.bootstrap import open_store
from bearerbridge.storage.store import SqlStore

from .support import Service, authorize_url, login_and_consent, pkce_pair, postgres_schema

WORKERS = 4
KILL_AFTER = (250, 450)  # answered requests before the kill, chosen at random; then up to 50 ms more
CALLBACK = "https://app.example/cb"


@dataclass
class Given:
    """A token as an answer gave it."""
    value: str
    source: str  # which answer, for the failure message: "op 123 (refresh)"


@dataclass
class Chain:
    """One grant as one thread saw it: the family of tokens rotated from one exchange."""
    name: str                                  # "w2.c5": worker 2's fifth grant
    client: dict
    code: tuple[str, str, str] | None = None   # (code, verifier, source) of a code grant
    access: list[Given] = field(default_factory=list)
    refresh: list[Given] = field(default_factory=list)  # in order: each but the last spent by a 200 refresh
    revoked: str | None = None                 # the revocation answered 200
    open_end: tuple[str, str] | None = None    # (kind, what) of the last request, which got no answer

    @property
    def expect_revoked(self) -> bool | None:
        """Whether its tokens must be revoked now; None when either is right (a revocation cut by the kill)."""
        if self.revoked:
            return True
        return None if self.open_end and self.open_end[0] == "revoke" else False

    @property
    def last_refresh_live(self) -> bool | None:
        """Whether its last refresh token must still work; None when either is right."""
        if not self.refresh or (self.open_end and self.open_end[0] == "refresh"):
            return None  # a refresh cut by the kill may have spent it
        revoked = self.expect_revoked
        return None if revoked is None else not revoked

    def __str__(self) -> str:
        return f"chain {self.name}" + (f", revoked by {self.revoked}" if self.revoked else "")


class Verdicts:
    """The claims checked, and the false ones said in full."""

    def __init__(self, backend: str, seed: int) -> None:
        self.backend, self.seed = backend, seed
        self.checked = 0
        self.false: list[str] = []
        self._lock = threading.Lock()

    def claim(self, holds: bool, claim: str, observed: object = "") -> None:
        with self._lock:
            self.checked += 1
            if not holds:
                self.false.append(f"  FALSE: {claim}" + (f" (observed: {observed})" if observed != "" else ""))

    def report(self, stage: str) -> str:
        return (f"{self.backend}, {stage}: {len(self.false)} of {self.checked} claims from the answers received "
                f"before kill -9 are false (seed {self.seed})" + "".join(f"\n{line}" for line in self.false[:30])
                + ("\n  ..." if len(self.false) > 30 else ""))


class Loop:
    """The client threads, and what the answers they received told them."""

    def __init__(self, service: Service, web: dict, machine: dict, seed: int, target: int) -> None:
        self.service = service
        self.web, self.machine = web, machine
        self.seed = seed
        self.target = target
        self.chains: list[Chain] = []
        self.problems: list[str] = []  # answers the loop did not expect: the loop is broken, not durability
        self.answered = self.unanswered = self.unavailable = 0
        self.in_flight = 0  # requests sent and not yet answered
        self.last_answer = 0.0
        self.reached = threading.Event()
        self.killed = threading.Event()
        self._lock = threading.Lock()

    def request(self, session: requests.Session, method: str, path: str, what: str,
                **kw) -> tuple[str, requests.Response] | None:
        """The answer and its name ("op 12 (refresh)"), or None when there is none to trust: the
        kill cut the request, or the service said 503 (it may have committed, or not)."""
        url = path if path.startswith("http") else self.service.url + path
        with self._lock:
            self.in_flight += 1
        try:
            response = session.request(method, url, timeout=10, allow_redirects=False, **kw)
        except requests.RequestException as error:
            with self._lock:
                self.unanswered += 1
                self.in_flight -= 1
            if not self.killed.is_set():
                self.problems.append(f"{what}: no answer while the service ran ({error})")
            return None
        with self._lock:
            self.answered += 1
            self.in_flight -= 1
            number, self.last_answer = self.answered, time.monotonic()
        if number == self.target:
            self.reached.set()
        if response.status_code == 503:
            with self._lock:
                self.unavailable += 1
            return None
        return f"op {number} ({what})", response

    def expect(self, got: tuple[str, requests.Response], status: int) -> bool:
        source, response = got
        if response.status_code != status:
            self.problems.append(f"{source} answered {response.status_code}, not {status}: {response.text[:300]}")
            return False
        return True

    def work(self, index: int, username: str, password: str) -> None:
        try:
            self._work(index, username, password)
        except Exception as error:  # a thread's failure reaches the test as a problem
            self.problems.append(f"worker {index} failed: {error!r}")

    def _work(self, index: int, username: str, password: str) -> None:
        rng = random.Random(self.seed + index)
        api, browser = requests.Session(), requests.Session()
        api.trust_env = browser.trust_env = False
        # Sign in and consent once, before the loop: later /authorize requests redirect at once.
        login_and_consent(browser, self.service.url, authorize_url(
            self.service.url, self.web["client_id"], CALLBACK, pkce_pair()[1], "imap"), username, password)
        chain: Chain | None = None
        number = 0
        try:
            while not self.killed.is_set():
                if chain is None or chain.revoked:
                    number += 1
                    name = f"w{index}.c{number}"
                    chain = self.issue(api, name) if rng.random() < 0.2 else self.code_grant(api, browser, name)
                    if chain is None:
                        return
                    self.chains.append(chain)
                    continue
                roll = rng.random()
                if roll < 0.65 and chain.refresh:
                    ok = self.refresh(api, chain)
                elif roll < 0.85:
                    ok = self.revoke(api, chain, rng)
                else:
                    chain, ok = None, True  # leave this grant live, with all its tokens, and begin another
                if not ok:
                    return
        finally:
            api.close()
            browser.close()

    def code_grant(self, api: requests.Session, browser: requests.Session, name: str) -> Chain | None:
        verifier, challenge = pkce_pair()
        got = self.request(browser, "GET", authorize_url(self.service.url, self.web["client_id"], CALLBACK,
                                                         challenge, "imap", state=name), "authorize")
        if got is None or not self.expect(got, 302):
            return None
        code = parse_qs(urlsplit(got[1].headers["Location"]).query)["code"][0]
        got = self.request(api, "POST", "/token", "code exchange", auth=self._auth(self.web), data={
            "grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": CALLBACK})
        if got is None or not self.expect(got, 200):
            return None  # the exchange may have happened, or not: the code is claimed neither way
        tokens = got[1].json()
        return Chain(name, self.web, code=(code, verifier, got[0]), access=[Given(tokens["access_token"], got[0])],
                     refresh=[Given(tokens["refresh_token"], got[0])])

    def issue(self, api: requests.Session, name: str) -> Chain | None:
        got = self.request(api, "POST", "/token", "client credentials", auth=self._auth(self.machine),
                           data={"grant_type": "client_credentials", "scope": "imap"})
        if got is None or not self.expect(got, 200):
            return None
        return Chain(name, self.machine, access=[Given(got[1].json()["access_token"], got[0])])

    def refresh(self, api: requests.Session, chain: Chain) -> bool:
        what = f"refresh in {chain.name} with its refresh token #{len(chain.refresh)}"
        got = self.request(api, "POST", "/token", what, auth=self._auth(chain.client),
                           data={"grant_type": "refresh_token", "refresh_token": chain.refresh[-1].value})
        if got is None:
            chain.open_end = ("refresh", what)
            return False
        if not self.expect(got, 200):
            return False
        tokens = got[1].json()
        chain.access.append(Given(tokens["access_token"], got[0]))
        chain.refresh.append(Given(tokens["refresh_token"], got[0]))
        return True

    def revoke(self, api: requests.Session, chain: Chain, rng: random.Random) -> bool:
        which = rng.choice([("access", i) for i in range(len(chain.access))]
                           + [("refresh", len(chain.refresh) - 1)] * bool(chain.refresh))
        token = (chain.access if which[0] == "access" else chain.refresh)[which[1]]
        what = f"revocation in {chain.name} of its {which[0]} token #{which[1] + 1}"
        got = self.request(api, "POST", "/revoke", what, auth=self._auth(chain.client), data={"token": token.value})
        if got is None:
            chain.open_end = ("revoke", what)
            return False
        if not self.expect(got, 200):
            return False
        chain.revoked = got[0]
        return True

    @staticmethod
    def _auth(client: dict) -> tuple[str, str]:
        return client["client_id"], client["client_secret"]


# -- the claims, checked in the database and over HTTP -------------------------------------------

def check_database(config_path: Path, chains: list[Chain], verdicts: Verdicts) -> None:
    """The rows as the killed process left them, read with the service's own store."""
    store = open_store(configuration.load(config_path))
    try:
        with store.transaction():
            for chain in chains:
                check_rows(store, chain, verdicts)
    finally:
        store.engine.dispose()


def check_rows(store: SqlStore, chain: Chain, verdicts: Verdicts) -> None:
    revoked = chain.expect_revoked
    state = "revoked" if revoked else "not revoked"
    for given in chain.access:
        row = store.find_access_token(given.value)
        verdicts.claim(row is not None, f"the access token from {given.source}, {chain}, is in the database")
        if row is not None and revoked is not None:
            verdicts.claim(row.revoked == revoked,
                           f"the access token from {given.source}, {chain}, is {state} in the database")
    for position, given in enumerate(chain.refresh):
        row = store.find_refresh_token(given.value)
        verdicts.claim(row is not None, f"the refresh token from {given.source}, {chain}, is in the database")
        if row is None:
            continue
        if position < len(chain.refresh) - 1:
            verdicts.claim(row.rotated, f"the refresh token from {given.source}, {chain}, is marked rotated: "
                                        f"{chain.refresh[position + 1].source} spent it")
        elif chain.last_refresh_live:
            verdicts.claim(not row.rotated, f"the refresh token from {given.source}, {chain}, its last and live, is "
                                            "not marked rotated")
        if revoked is not None:
            verdicts.claim(row.revoked == revoked,
                           f"the refresh token from {given.source}, {chain}, is {state} in the database")
    if chain.code is not None:
        code = store.find_code(chain.code[0])
        verdicts.claim(code is not None and code.used,
                       f"the code exchanged by {chain.code[2]}, {chain}, is marked used in the database",
                       "missing" if code is None else "unused")


class Http:
    """The restarted service's answers; one requests session per checking thread."""

    def __init__(self, service: Service, resource_server: dict) -> None:
        self.service, self.resource_server = service, resource_server
        self._local = threading.local()

    def post(self, path: str, client: dict, data: dict) -> requests.Response:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
        return session.post(self.service.url + path, data=data, timeout=10,
                            auth=(client["client_id"], client["client_secret"]))

    def active(self, token: str, client: dict | None = None, hint: str | None = None) -> object:
        """True or False for an introspection answer, else the unexpected answer itself."""
        data = {"token": token, **({"token_type_hint": hint} if hint else {})}
        response = self.post("/introspect", client or self.resource_server, data)
        if response.status_code != 200:
            return f"{response.status_code} {response.text[:200]}"
        return response.json()["active"]

    def refresh(self, chain: Chain, token: str) -> requests.Response:
        return self.post("/token", chain.client, {"grant_type": "refresh_token", "refresh_token": token})


def refused(response: requests.Response) -> bool:
    try:
        return response.status_code == 400 and response.json().get("error") == "invalid_grant"
    except ValueError:  # not JSON
        return False


def check_quietly(http: Http, chain: Chain, verdicts: Verdicts) -> None:
    """Introspection only: nothing here changes a token."""
    revoked = chain.expect_revoked
    for given in chain.access:
        if revoked is not None:
            active = http.active(given.value)
            verdicts.claim(active is (not revoked), f"the access token from {given.source}, {chain}, introspects "
                                                    f"{'inactive' if revoked else 'active'}", active)
    for position, given in enumerate(chain.refresh):
        last = position == len(chain.refresh) - 1
        live = chain.last_refresh_live if last else False
        if live is None:
            continue
        active = http.active(given.value, chain.client, "refresh_token")
        state = "live" if live else ("revoked" if chain.revoked and last else "spent")
        verdicts.claim(active is live, f"the refresh token from {given.source}, {chain}, introspects "
                                       f"{'active' if live else 'inactive'} to its client ({state})", active)


def check_by_using(http: Http, chain: Chain, verdicts: Verdicts) -> None:
    """Refresh with the refresh tokens and exchange the code again, in an order that leaves each
    claim's check unaffected by the others' (presenting a spent token revokes the family)."""
    if chain.refresh and chain.last_refresh_live is not None:
        given = chain.refresh[-1]
        response = http.refresh(chain, given.value)
        if chain.last_refresh_live:
            verdicts.claim(response.status_code == 200, f"the refresh token from {given.source}, {chain}, the "
                                                        "last it was given, still refreshes",
                           f"{response.status_code} {response.text[:200]}")
            if response.status_code == 200:
                active = http.active(response.json()["access_token"])
                verdicts.claim(active is True, f"the access token refreshed with the last refresh token of {chain} "
                                               "introspects active", active)
        else:
            verdicts.claim(refused(response), f"the refresh token from {given.source}, {chain}, is refused: its "
                                              "grant was revoked", f"{response.status_code} {response.text[:200]}")
    for position, given in enumerate(chain.refresh[:-1]):
        response = http.refresh(chain, given.value)
        verdicts.claim(refused(response), f"the refresh token from {given.source}, {chain}, is refused: "
                                          f"{chain.refresh[position + 1].source} spent it",
                       f"{response.status_code} {response.text[:200]}")
    if chain.code is not None:
        code, verifier, source = chain.code
        response = http.post("/token", chain.client, {"grant_type": "authorization_code", "code": code,
                                                      "code_verifier": verifier, "redirect_uri": CALLBACK})
        verdicts.claim(refused(response), f"the code exchanged by {source}, {chain}, is refused a second exchange",
                       f"{response.status_code} {response.text[:200]}")


def in_parallel(check: Callable[[Http, Chain, Verdicts], None], http: Http, chains: list[Chain],
                verdicts: Verdicts) -> None:
    """Each chain's checks in order; chains (independent families) side by side."""
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda chain: check(http, chain, verdicts), chains))


# -- the test -----------------------------------------------------------------------------------

@contextlib.contextmanager
def database(backend: str, directory: Path):
    """(url, extra config) of a fresh database: an SQLite file, or a PostgreSQL schema served by a
    few threads (the default, one, is SQLite's)."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'bearerbridge.db'}", ""
    else:
        with postgres_schema() as url:
            yield url, "threads = 4\n"  # appended to the [database] table that Service.start writes


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_answer_survives_kill_9(tmp_path, backend):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with database(backend, tmp_path) as (url, extra):
        service = Service.start(tmp_path, database_url=url, extra=extra)
        restarted = None
        try:
            web = service.client("--redirect-uri", CALLBACK, "--scope", "imap")
            machine = service.client("--grant", "client_credentials", "--scope", "imap")
            resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
            loop = Loop(service, web, machine, seed, target=rng.randint(*KILL_AFTER))
            threads = [threading.Thread(target=loop.work, args=(i, *service.user()), daemon=True)
                       for i in range(WORKERS)]
            for thread in threads:
                thread.start()
            reached = loop.reached.wait(30)
            assert reached, f"{backend}: the loop stopped after {loop.answered} answers: {loop.problems[:5]}"
            time.sleep(rng.uniform(0, 0.05))
            loop.killed.set()  # first: from here on, a request without an answer is the kill's doing
            in_flight = loop.in_flight
            service.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            service.process.wait(10)
            for thread in threads:
                thread.join(15)
            assert not any(thread.is_alive() for thread in threads), f"{backend}: a client thread hangs"
            assert not loop.problems, f"{backend}: the loop got answers it did not expect: {loop.problems[:5]}"
            assert in_flight > 0 and killed_at - loop.last_answer < 2, (
                f"{backend}: the loop had stopped before the kill: {in_flight} requests in flight, the last answer "
                f"{killed_at - loop.last_answer:.2f} s before")

            chains = list(loop.chains)
            stored = Verdicts(backend, seed)
            check_database(service.config_path, chains, stored)

            restarted = Service.start(tmp_path, database_url=url, extra=extra)
            http, answered = Http(restarted, resource_server), Verdicts(backend, seed)
            in_parallel(check_quietly, http, chains, answered)
            in_parallel(check_by_using, http, chains, answered)
            assert not (stored.false or answered.false), (
                stored.report("in the database as the kill left it") + "\n"
                + answered.report("over HTTP after the restart"))
            print(f"{backend}: {loop.answered} answers before the kill ({loop.unavailable} were 503), {in_flight} "
                  f"requests in flight at it, {loop.unanswered} cut or refused by it; {len(chains)} grants; "
                  f"{stored.checked} claims checked in the database and {answered.checked} over HTTP, all true")
        finally:
            for running in (service, restarted):
                if running is not None:
                    running.stop()

"""CPU per SASL check on the Dovecot path, in-process: no sockets, no reactor, no other processes.

    .venv/bin/python bench/sasl_inprocess.py [--checks 50000] [--repeat 5] [--profile]

Builds the same validator, metrics, memory of last uses (uses.py) and Dovecot protocol as
`twistd bearerbridge` over a throwaway SQLite store, remembers 8 seeded tokens as a recent read
would, then feeds the protocol one `AUTH ... OAUTHBEARER` line per `dataReceived` call (as
Postfix sends them, see sasl_bench.request_tail) on a StringTransport, and prints the best of
`--repeat` runs in µs per check. It measures the Python of a remembered check alone, which
sasl_bench.py cannot separate from the reactor and the kernel; `--profile` prints cProfile's top
functions as well; `--no-uses` leaves out noting each grant's last use.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from sasl_bench import HOT_TOKENS, request_tail, seed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bearerbridge import bootstrap, config
from bearerbridge.metrics import Metrics
from bearerbridge.sasl.dovecot import DovecotAuthFactory
from bearerbridge.sasl.validator import Validator
from bearerbridge.storage.pool import StorePool
from bearerbridge.uses import LastUses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checks", type=int, default=50_000, help="AUTH lines per run")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is printed")
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    p.add_argument("--no-uses", action="store_true",
                   help="note no last uses (uses.py), to see what noting them costs")
    args = p.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="bearerbridge-sasl-inprocess-"))
    config_path = directory / "bearerbridge.toml"
    # cache_ttl at its maximum, so that nothing ages out of memory during the runs.
    config_path.write_text(f'[server]\nissuer = "http://127.0.0.1:1"\nsecret_key_file = "{directory / "key"}"\n'
                           f'[database]\nurl = "sqlite:///{directory / "db"}"\n[sasl]\ncache_ttl = 60\n')
    try:
        settings = config.load(config_path)
        username, tokens = seed(config_path, HOT_TOKENS)
        store = bootstrap.open_store(settings)
        with store.transaction():  # what a lookup in the pool would have noted
            store.find_access_tokens([store.keyring.digest(token) for token in tokens])
        metrics, clock = Metrics(), Clock()
        factory = DovecotAuthFactory(
            Validator(StorePool(store, 1), settings.sasl).validate, openid_configuration="https://x/.well-known",
            clock=clock, on_decision=functools.partial(metrics.sasl_decision, "dovecot", settings.sasl.services),
            uses=None if args.no_uses else LastUses())  # each OK noted as its grant's last use, never written here
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"VERSION\t1\t2\nCPID\t1\n")
        tails = [request_tail(username, token) for token in tokens]
        lines = [b"AUTH\t%d" % i + tails[i % len(tails)] for i in range(1, args.checks + 1)]

        def run() -> None:
            for line in lines:
                protocol.dataReceived(line)
            answered = transport.value().count(b"\nOK\t") + transport.value().startswith(b"OK\t")
            assert answered == len(lines), f"{answered} of {len(lines)} answered OK"
            transport.clear()
            clock.advance(1)  # the decision log's timer

        run()  # warm up, and check that every line is answered OK
        best = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        print(f"{1e6 * best / len(lines):.2f} µs per check (best of {args.repeat} runs of {len(lines)})")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(run)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        store.engine.dispose()

    finally:
        shutil.rmtree(directory)

if __name__ == "__main__":
    main()

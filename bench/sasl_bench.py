"""Load benchmark of the SASL authority: the Dovecot auth socket of one `twistd bearerbridge`.

    .venv/bin/python bench/sasl_bench.py [--connections 8] [--duration 10] [--pipeline 16] [--rate 20000] [--json]

Starts one service from a throwaway config (SQLite, HTTP and `[sasl] listen` on free loopback
ports, `[sasl] cache_ttl` 1 s), seeds a user, a client and many `smtp` access tokens straight
into the store, then drives the socket from several OS processes (raw non-blocking sockets and
`selectors`), each connection keeping up to --pipeline `AUTH ... OAUTHBEARER` requests
outstanding with fresh numeric ids, matching replies by id and timing each request from its
send to its reply line. Scenarios:

- hot:     the same few tokens over and over (answered from the validator's memory);
- hot@20k: open loop: hot tokens at a fixed total --rate (20,000/s), each request sent on its
           schedule without waiting for replies and timed from its scheduled send, by a C
           program (bench/openloop.c, compiled with `cc` into the temporary directory);
- cold:    every request a token the server has never seen (one database read each);
- latency: one connection, one request at a time (hot tokens).

Prints checks/s, p50/p99 latency, errors and server CPU per check (non-OK replies, lost replies) per scenario. When
the pipelined hot run's p99 is over 1 ms it also halves the pipeline depth until p99 <= 1 ms
and reports the throughput there (--no-sweep turns this off). The server is always stopped by
its PID at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from benchserver import BIN, BenchServer, cpu_seconds, folded_samples, free_port, machine_busy_seconds, record_profile

SERVICE = "smtp"
HOT_TOKENS = 8
OPENLOOP_C = Path(__file__).resolve().with_name("openloop.c")  # the open-loop generator
DRAIN = 5.0  # seconds the open-loop generator waits for outstanding replies after the window
MAX_P99_MS = 1.0


def log(message: str) -> None:
    print(f"[sasl-bench] {message}", file=sys.stderr, flush=True)


def seed(config_path: Path, count: int) -> tuple[str, list[str]]:
    """A user, a client and `count` fresh `smtp` access tokens, written straight into the store."""
    from bearerbridge import bootstrap, config
    from bearerbridge.storage.models import Client

    store = bootstrap.open_store(config.load(config_path))
    username = f"bench-{secrets.token_hex(3)}"
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    try:
        with store.transaction():
            user = store.add_user(username, f"{username}@example.org", None)
            client = Client(client_id=f"bench-{secrets.token_hex(6)}", name="sasl bench",
                            redirect_uris=("https://app.example/cb",), scope=SERVICE,
                            grant_types=("authorization_code", "refresh_token"), public=False)
            store.add_client(client, secrets.token_urlsafe(32))
            for token in tokens:
                store.save_token(token, None, client.client_id, user.id, SERVICE, 24 * 3600, None)
    finally:
        store.engine.dispose()
    return username, tokens


def request_tail(username: str, token: str) -> bytes:
    """Everything of an AUTH line after its id, as Postfix sends it (see tests/test_sasl_service.py)."""
    message = f"n,a={username},\x01host=mail.example\x01port=587\x01auth=Bearer {token}\x01\x01"
    resp = base64.b64encode(message.encode()).decode()
    return (f"\tOAUTHBEARER\tservice={SERVICE}\tnologin\tlip=127.0.0.1\trip=127.0.0.1"
            f"\tresp={resp}\n").encode()


# -- the closed-loop load generator (runs in worker processes) ------------------------------------

class Connection:
    __slots__ = ("sock", "inbuf", "outbuf", "outstanding", "acking", "next_id", "closed")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        while b"\nDONE\n" not in buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            buffer += chunk
        self.inbuf = buffer.split(b"\nDONE\n", 1)[1]
        self.sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
        self.sock.setblocking(False)
        self.outbuf = b""
        self.outstanding: dict[bytes, float] = {}  # id -> send time
        self.acking: set[bytes] = set()            # ids whose error challenge we acknowledged
        self.next_id = 1
        self.closed = False


def worker(pipe, port: int, connections: int, pipeline: int, tails: list[bytes]) -> None:
    """Hold `connections` connections, report ready, then run between the times sent by the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conns = [Connection(port) for _ in range(connections)]
    except OSError as e:
        pipe.send({"error": f"connect: {e}"})
        return
    pipe.send({"ready": True})
    go, t_start, t_end = pipe.recv()
    monotonic = time.monotonic
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    latencies = array("d")
    counts: Counter[str] = Counter()
    samples: list[str] = []
    n_tails = len(tails)
    position = 0
    wraps = 0
    cpu_start = cpu_end = None

    def fill(conn: Connection, now: float) -> None:
        nonlocal position, wraps
        free = pipeline - len(conn.outstanding)
        if free <= 0 or conn.closed:
            return
        parts = []
        outstanding = conn.outstanding
        for _ in range(free):
            rid = b"%d" % conn.next_id
            conn.next_id += 1
            parts.append(b"AUTH\t" + rid + tails[position])
            position += 1
            if position == n_tails:
                position = 0
                wraps += 1
            outstanding[rid] = now
        send(conn, b"".join(parts))

    def send(conn: Connection, data: bytes) -> None:
        data = conn.outbuf + data if conn.outbuf else data
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        conn.outbuf = data[sent:]
        selector.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0), conn)

    while monotonic() < go:
        time.sleep(0.0005)
    now = monotonic()
    for conn in conns:
        fill(conn, now)
    sending = True
    drain_until = t_end + 5.0
    while True:
        now = monotonic()
        if sending and now >= t_end:
            sending = False
            cpu_end = time.process_time()
        if cpu_start is None and now >= t_start:
            cpu_start = time.process_time()
        if not sending and (now >= drain_until or not any(c.outstanding for c in conns if not c.closed)):
            break
        for key, events in selector.select(0.05):
            conn = key.data
            if events & selectors.EVENT_WRITE and conn.outbuf:
                send(conn, b"")
            if not events & selectors.EVENT_READ:
                continue
            try:
                chunk = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as e:
                chunk = b""
                samples.append(f"recv: {e}")
            now = monotonic()
            if not chunk:
                conn.closed = True
                counts["lost"] += len(conn.outstanding)
                conn.outstanding.clear()
                selector.unregister(conn.sock)
                continue
            data = conn.inbuf + chunk
            *lines, conn.inbuf = data.split(b"\n")
            in_window = t_start <= now < t_end
            outstanding = conn.outstanding
            for line in lines:
                kind, _, rest = line.partition(b"\t")
                rid, _, rest = rest.partition(b"\t")
                sent_at = outstanding.pop(rid, None)
                if sent_at is None:
                    counts["unmatched"] += 1
                    continue
                if kind == b"OK":
                    counts["ok"] += 1
                    if in_window:
                        counts["window"] += 1
                        latencies.append(now - sent_at)
                    continue
                if kind == b"CONT" and rid not in conn.acking:
                    # OAUTHBEARER error challenge: acknowledge it (RFC 7628 §3.2.3) so the
                    # request ends, and count the error once.
                    conn.acking.add(rid)
                    outstanding[rid] = sent_at
                    send(conn, b"CONT\t" + rid + b"\tAQ==\n")
                    if len(samples) < 5:
                        samples.append(line.decode("utf-8", "replace"))
                    continue
                conn.acking.discard(rid)
                counts["failed"] += 1
                if len(samples) < 5:
                    samples.append(line.decode("utf-8", "replace"))
            if sending and not conn.closed:
                fill(conn, now)
    for conn in conns:
        counts["lost"] += len(conn.outstanding)
        conn.sock.close()
    pipe.send({"latencies": latencies, "counts": dict(counts), "samples": samples,
               "cpu": (cpu_end or time.process_time()) - (cpu_start or 0.0), "wraps": wraps,
               "used": wraps * n_tails + position})


# -- scenarios ------------------------------------------------------------------------------------

def percentile(sorted_values: array, fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def ms(seconds: float | None) -> float:
    """Seconds as ms, rounded; no value (NaN here, None from openloop's JSON null) gives NaN."""
    return round(1000 * (float("nan") if seconds is None else seconds), 3)


def measure_window(server: BenchServer, name: str, t_start: float, duration: float, profile: Path | None,
                   gil: bool) -> tuple[float, float]:
    """The server's and the whole machine's CPU seconds over the `duration` seconds from `t_start`
    (time.monotonic()), meanwhile sampling the server with py-spy into PROFILE/NAME.folded if asked."""
    t_end = t_start + duration
    time.sleep(max(0.0, t_start - time.monotonic()))
    server_cpu, machine_cpu = cpu_seconds(server.pid), machine_busy_seconds()
    spy = record_profile(server.pid, profile / f"{name}.folded", duration, gil) if profile is not None else None
    time.sleep(max(0.0, t_end - time.monotonic()))
    server_cpu = cpu_seconds(server.pid) - server_cpu
    machine_cpu = machine_busy_seconds() - machine_cpu
    if spy is not None:
        spy.wait(60)
    return server_cpu, machine_cpu


def summarize(name: str, connections: int, pipeline: int, duration: float, counts: Mapping[str, int],
              latency: Mapping[str, float | None], samples: list[str], client_cpu: float, server_cpu: float,
              machine_cpu: float) -> dict:
    """A run's result from its counts (window, failed, lost, unmatched), its latency percentiles in
    seconds (p50, p90, p99, max) and the CPU seconds over its window."""
    errors = counts["failed"] + counts["lost"] + counts["unmatched"]
    return {
        "scenario": name, "connections": connections, "pipeline": pipeline, "seconds": duration,
        "checks": counts["window"], "checks_per_s": round(counts["window"] / duration, 1),
        "p50_ms": ms(latency["p50"]), "p90_ms": ms(latency["p90"]), "p99_ms": ms(latency["p99"]),
        "max_ms": ms(latency["max"]),
        "errors": errors, "failed": counts["failed"], "lost": counts["lost"], "unmatched": counts["unmatched"],
        "error_samples": samples[:5],
        "server_cpu_pct": round(100 * server_cpu / duration, 1),
        "client_cpu_pct": round(100 * client_cpu / duration, 1),
        "other_cpu_pct": round(max(0.0, 100 * (machine_cpu - server_cpu - client_cpu) / duration), 1),
        # Server CPU per answered check: the cost that the hot path optimisations aim at.
        "server_us_per_check": round(1e6 * server_cpu / max(1, counts["window"]), 1),
    }


def run_closed(server: BenchServer, name: str, tails: list[bytes], connections: int, pipeline: int,
               duration: float, warmup: float, workers: int, fresh: bool, profile: Path | None = None,
               gil: bool = True) -> dict:
    """One measured closed-loop run (see worker); with `fresh`, `tails` are split between the workers."""
    workers = max(1, min(workers, connections))
    context = multiprocessing.get_context("fork")
    procs = []
    per_worker = [connections // workers + (i < connections % workers) for i in range(workers)]
    for i, count in enumerate(per_worker):
        share = tails[i::workers] if fresh else tails
        parent, child = context.Pipe()
        proc = context.Process(target=worker, args=(child, server.sasl_port, count, pipeline, share), daemon=True)
        proc.start()
        procs.append((proc, parent))
    try:
        for _proc, pipe in procs:
            answer = pipe.recv()
            if "error" in answer:
                raise RuntimeError(answer["error"])
        go = time.monotonic() + 0.2
        t_start = go + warmup
        t_end = t_start + duration
        for _, pipe in procs:
            pipe.send((go, t_start, t_end))
        server_cpu, machine_cpu = measure_window(server, name, t_start, duration, profile, gil)
        results = [pipe.recv() for _, pipe in procs]
    finally:
        for proc, _ in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    latencies = array("d")
    counts: Counter[str] = Counter()
    samples: list[str] = []
    for r in results:
        latencies.extend(r["latencies"])
        counts.update(r["counts"])
        samples += r["samples"]
    ordered = array("d", sorted(latencies))
    latency = {"p50": percentile(ordered, 0.50), "p90": percentile(ordered, 0.90),
               "p99": percentile(ordered, 0.99), "max": percentile(ordered, 1.0)}
    summary = summarize(name, connections, pipeline, duration, counts, latency, samples,
                        sum(r["cpu"] for r in results), server_cpu, machine_cpu)
    if fresh:
        summary["tokens_used"] = sum(r["used"] for r in results)
        summary["token_set_wraps"] = sum(r["wraps"] for r in results)
    return summary


def build_openloop(directory: Path) -> Path:
    """Compile the open-loop generator, bench/openloop.c, into `directory`."""
    compiler = os.environ.get("CC", "cc")
    binary = directory / "openloop"
    try:
        subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(OPENLOOP_C)],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"[sasl-bench] hot@20k needs a C compiler for {OPENLOOP_C}: no `{compiler}` "
                         "(apt-get install gcc, or set CC)") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"[sasl-bench] `{compiler}` could not compile {OPENLOOP_C}:\n{e.stderr}") from None
    return binary


def run_open(server: BenchServer, name: str, tails: list[bytes], connections: int, rate: float,
             duration: float, warmup: float, generator: Path, profile: Path | None = None,
             gil: bool = True) -> dict:
    """One measured open-loop run by `generator` (openloop.c, one process): `rate` requests/s
    round-robin over `connections`, each due on a fixed schedule whatever the replies do and
    timed from its due time, not its send, so that a late generator cannot hide latency."""
    tails_path = server.directory / f"{name}.tails"
    tails_path.write_bytes(b"".join(tails))
    # When request 0 is due, on the generator's clock too (CLOCK_MONOTONIC): time to start and connect.
    go = time.monotonic() + 0.5
    proc = subprocess.Popen(
        [str(generator), "127.0.0.1", str(server.sasl_port), str(connections), str(rate), str(go),
         str(warmup), str(duration), str(DRAIN), str(tails_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        server_cpu, machine_cpu = measure_window(server, name, go + warmup, duration, profile, gil)
        out, err = proc.communicate(timeout=DRAIN + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{generator.name} exited with {proc.returncode}: {err.decode(errors='replace').strip()}")
    r = json.loads(out)
    summary = summarize(name, connections, 0, duration, counts=r, latency=r, samples=r["samples"],
                        client_cpu=r["cpu"], server_cpu=server_cpu, machine_cpu=machine_cpu)
    summary.update({
        "offered_per_s": rate, "sent_per_s": round(r["sent"] / duration, 1),
        "lag_p50_ms": ms(r["lag_p50"]), "lag_p99_ms": ms(r["lag_p99"]), "lag_max_ms": ms(r["lag_max"]),
    })
    return summary


TARGETS = {  # the project's: one process, 2 cores, 8 connections
    # Met by the pipelined runs (the benchmark issue #3 describes) when any depth meets it.
    "hot": {"min_rate": 20000, "max_p99_ms": MAX_P99_MS},
    # The open-loop run holds the server to the same figures at a fixed offered rate, which is
    # stricter: there "ok" means the offered rate is at least 20,000/s and the server answered
    # 99% of it inside the window (see judge()). It is reported, and does not set the exit status.
    "hot@rate": {"min_rate": 20000, "max_p99_ms": MAX_P99_MS},
    "cold": {"min_rate": 5000},
    "latency": {"max_p50_ms": 0.5},
}


def judge(result: dict) -> None:
    if "offered_per_s" in result:
        target = TARGETS["hot@rate"]
    else:
        target = TARGETS.get(result["scenario"].split("@")[0])
    if not target:
        return
    ok = result["errors"] == 0
    if "offered_per_s" in result:
        # At a fixed offered rate the answers can only match it, give or take the requests in
        # flight at the window's edges: 1% slack, and the offered rate itself must reach the target.
        ok = ok and result["offered_per_s"] >= target["min_rate"] and \
            result["checks_per_s"] >= 0.99 * result["offered_per_s"]
    elif "min_rate" in target:
        ok = ok and result["checks_per_s"] >= target["min_rate"]
    if "max_p99_ms" in target:
        ok = ok and result["p99_ms"] <= target["max_p99_ms"]
    if "max_p50_ms" in target:
        ok = ok and result["p50_ms"] <= target["max_p50_ms"]
    result["target"] = target
    result["meets_target"] = ok
    result["stricter"] = "offered_per_s" in result


def missed_targets(results: list[dict]) -> list[str]:
    """The scenarios whose target is missed: the pipelined hot runs together (one depth that meets
    it is enough: the sweep looks for it), the others each on its own, the open loop never."""
    hot = [r for r in results if "meets_target" in r and r["scenario"].split("@")[0] == "hot" and not r["stricter"]]
    missed = [r["scenario"] for r in results
              if r.get("meets_target") is False and r not in hot and not r["stricter"]]
    if hot and not any(r["meets_target"] for r in hot):
        missed.insert(0, "hot")
    return missed


def print_table(results: list[dict], stream) -> None:
    header = (f"{'scenario':<14} {'conn':>4} {'pipe':>4} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7} {'errors':>6}  {'target':<22} {'ok':<3} {'server':>6} {'us/chk':>6} {'client':>6} "
              f"{'other':>5}")
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        t = r.get("target", {})
        target = " ".join(filter(None, [
            f">={t['min_rate']}/s" if "min_rate" in t else "",
            f"p99<={t['max_p99_ms']:g}" if "max_p99_ms" in t else "",
            f"p50<={t['max_p50_ms']:g}" if "max_p50_ms" in t else ""]))
        ok = "" if "meets_target" not in r else ("yes" if r["meets_target"] else "NO")
        pipeline = "open" if "offered_per_s" in r else r["pipeline"]
        print(f"{r['scenario']:<14} {r['connections']:>4} {pipeline:>4} {r['checks_per_s']:>9.0f} "
              f"{r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['max_ms']:>7.2f} {r['errors']:>6}  {target:<22} "
              f"{ok:<3} {r['server_cpu_pct']:>5.0f}% {r['server_us_per_check']:>6.1f} {r['client_cpu_pct']:>5.0f}% "
              f"{r['other_cpu_pct']:>4.0f}%",
              file=stream)
    print(f"(cpu: % of one core over the measured window; {os.cpu_count()} cores. 'client' is the load "
          "generator's processes, 'other' everything else on the machine; 'us/chk' server CPU per answer)",
          file=stream)
    missed = missed_targets(results)
    print("targets: " + (f"MISSED by {', '.join(missed)}" if missed else "met") +
          " (hot: by any pipeline depth; the open loop is a stricter check, reported only)", file=stream)
    for r in results:
        if "offered_per_s" in r:
            print(f"{r['scenario']}: open loop, offered {r['offered_per_s']:.0f}/s, sent {r['sent_per_s']:.0f}/s; "
                  f"latency from each request's scheduled send; generator lag (send - schedule) "
                  f"p50 {r['lag_p50_ms']:.3f} ms, p99 {r['lag_p99_ms']:.3f} ms, max {r['lag_max_ms']:.2f} ms, "
                  f"generator cpu {r['client_cpu_pct']:.0f}%", file=stream)
        if "tokens_used" in r:
            print(f"{r['scenario']}: {r['tokens_used']} distinct tokens sent (warm-up included), "
                  f"token set wrapped {r['token_set_wraps']} times", file=stream)
        if r["errors"]:
            print(f"{r['scenario']}: {r['failed']} failed, {r['lost']} lost, {r['unmatched']} unmatched; "
                  f"e.g. {r['error_samples']}", file=stream)


# Where a check's time goes: (label, function names), each counted inclusively.
PARTS = (
    ("Dovecot line parsing (parse_line)", ("parse_line",)),
    ("OAUTHBEARER parsing (ServerExchange.receive)", ("ServerExchange.receive",)),
    ("Validator.validate (digest, memory, batching)", ("Validator.validate",)),
    ("  HMAC digest of the token", ("Keyring.digest",)),
    ("  judge()", ("judge",)),
    ("Deferred.addTimeout (a callLater per check)", ("Deferred.addTimeout",)),
    ("logging each decision (Logger.emit)", ("Logger.emit",)),
    ("metrics counter (Metrics.sasl_decision)", ("Metrics.sasl_decision",)),
    ("verdict -> reply line (DovecotAuthConnection.verdict)", ("DovecotAuthConnection.verdict",)),
    ("transport.write + socket writes", ("Connection.write", "FileDescriptor.write", "FileDescriptor.doWrite",
                                         "Connection.doWrite")),
    ("socket reads (doRead minus dataReceived)", ("Connection.doRead",)),
    ("timed calls (runUntilCurrent)", ("ReactorBase.runUntilCurrent",)),
    ("thread hop: deferToThreadPool/callFromThread", ("deferToThreadPool", "callFromThread",
                                                        "ThreadPool.callInThreadWithCallback")),
    ("batch answers in the reactor (_batch_done)", ("Validator._batch_done",)),
    ("store query in a pool thread (find_access_tokens)", ("SqlStore.find_access_tokens",)),
    ("  SQLAlchemy compile/execute", ("Connection.execute",)),
    ("  rows -> Token (SqlStore._token)", ("SqlStore._token",)),
)


def top_functions(folded: Path, limit: int = 12) -> str:
    """Per thread, per part of the check (see PARTS) and per function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for thread, frames, n in folded_samples(folded):
        names = [f.split(" (", 1)[0] for f in frames]
        threads[thread or "?"] += n
        total += n
        own[frames[-1]] += n
        present = set(names)
        for label, functions in PARTS:
            if any(f in present for f in functions):
                parts[label] += n
        if "Connection.doRead" in present and "LineOnlyReceiver.dataReceived" in present:
            parts["socket reads (doRead minus dataReceived)"] -= n
    if not total:
        return "(no samples)"
    out = [f"{total} non-idle samples; shares of them"]
    out += ["by thread:"] + [f"  {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(6)]
    out += ["by part (inclusive):"] + [f"  {100 * parts[label] / total:5.1f}%  {label}"
                                      for label, _ in PARTS if parts[label] > 0]
    out += ["self time by function:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(limit)]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", "-c", type=int, default=8, help="connections of the hot and cold scenarios")
    p.add_argument("--duration", "-d", type=float, default=10, help="measured seconds per scenario")
    p.add_argument("--warmup", type=float, default=1, help="unmeasured seconds of load before each scenario")
    p.add_argument("--pipeline", "-p", type=int, default=16, help="outstanding requests per connection")
    p.add_argument("--workers", type=int, default=2,
                   help="load generator processes of the closed-loop scenarios (hot@20k has one, in C)")
    p.add_argument("--only", action="append", choices=("hot", "hot@20k", "cold", "latency"),
                   help="run only these scenarios (hot@20k: the open-loop one, at --rate)")
    p.add_argument("--rate", type=float, default=20000,
                   help="total requests/s offered by the open-loop scenario hot@20k (renamed after it)")
    p.add_argument("--cold-tokens", type=int,
                   help="distinct tokens seeded for the cold scenario (default: 10,000 per second of it, "
                        "warm-up included)")
    p.add_argument("--cache-ttl", type=float, default=1.0, help="[sasl] cache_ttl of the server")
    p.add_argument("--threads", type=int, help="[database] threads of the server (default: the config's)")
    p.add_argument("--no-sweep", action="store_true",
                   help="do not look for the pipeline depth at which the hot p99 is within 1 ms")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record each scenario with py-spy into DIR/NAME.folded and print its hot spots "
                        "(throughput is lower while profiling)")
    p.add_argument("--profile-all-threads", action="store_true",
                   help="with --profile, sample every running thread, not only the one holding the GIL "
                        "(shows the store threads in SQLite, and threads waiting for the GIL)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (table on stderr)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (config, database, log)")
    args = p.parse_args(argv)
    args.scenarios = args.only or ["hot", "hot@20k", "cold", "latency"]
    if args.cold_tokens is None:
        args.cold_tokens = int(10_000 * (args.duration + args.warmup)) if "cold" in args.scenarios else 0
    if args.profile and not (BIN / "py-spy").exists():
        p.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through `finally`: stop the server
    directory = Path(tempfile.mkdtemp(prefix="bearerbridge-sasl-bench-"))
    sasl_port = free_port()
    server = BenchServer(
        directory, args.threads,
        extra=f'[sasl]\nlisten = ["tcp:{sasl_port}:interface=127.0.0.1"]\ncache_ttl = {args.cache_ttl}\n',
        ready=lambda: socket.create_connection(("127.0.0.1", sasl_port), timeout=2).close())
    server.sasl_port = sasl_port
    results: list[dict] = []
    try:
        openloop = build_openloop(directory) if "hot@20k" in args.scenarios else None
        started = time.monotonic()
        username, tokens = seed(server.config_path, HOT_TOKENS + args.cold_tokens)
        log(f"seeded {len(tokens)} tokens in {time.monotonic() - started:.1f}s")
        hot = [request_tail(username, t) for t in tokens[:HOT_TOKENS]]
        cold = [request_tail(username, t) for t in tokens[HOT_TOKENS:]]
        server.start()
        log(f"twistd pid {server.pid}, SASL on 127.0.0.1:{server.sasl_port} (directory {directory})")
        # One check by hand: the token must log in as the seeded user.
        probe = Connection(server.sasl_port)
        probe.sock.setblocking(True)
        probe.sock.sendall(b"AUTH\t1" + hot[0])
        reply = probe.inbuf
        while b"\n" not in reply:
            chunk = probe.sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        probe.sock.close()
        if not reply.startswith(f"OK\t1\tuser={username}\n".encode()):
            raise RuntimeError(f"preflight AUTH failed: {reply!r}\n{server.log_tail()}")

        def run(name: str, tails: list[bytes], connections: int, pipeline: int, duration: float,
                fresh: bool = False, rate: float | None = None) -> dict:
            profile = args.profile if name in ("hot", "cold") or rate else None
            gil = not args.profile_all_threads
            if rate:
                result = run_open(server, name, tails, connections, rate, duration, args.warmup, openloop,
                                  profile, gil)
            else:
                result = run_closed(server, name, tails, connections, pipeline, duration, args.warmup,
                                    args.workers, fresh, profile, gil)
            judge(result)
            results.append(result)
            log(f"{name}: {result['checks_per_s']:.0f} checks/s, p50 {result['p50_ms']:.3f} ms, "
                f"p99 {result['p99_ms']:.3f} ms, {result['errors']} errors")
            if profile is not None:
                print(f"\n== py-spy profile of {name} ==\n{top_functions(profile / f'{name}.folded')}\n",
                      file=sys.stderr)
            return result

        for scenario in args.scenarios:
            if scenario == "hot":
                result = run("hot", hot, args.connections, args.pipeline, args.duration)
                depth = args.pipeline
                while not args.no_sweep and result["p99_ms"] > MAX_P99_MS and depth > 1:
                    depth //= 2
                    result = run(f"hot@p{depth}", hot, args.connections, depth, max(3.0, args.duration / 2))
            elif scenario == "hot@20k":
                run(f"hot@{args.rate / 1000:g}k", hot, args.connections, 0, args.duration, rate=args.rate)
            elif scenario == "cold":
                run("cold", cold, args.connections, args.pipeline, args.duration, fresh=True)
            else:
                run("latency", hot, 1, 1, args.duration)
    finally:
        server.stop()
        if args.keep:
            log(f"kept {directory}")
        else:
            for path in sorted(directory.rglob("*"), reverse=True):
                path.unlink() if not path.is_dir() else path.rmdir()
            directory.rmdir()
    print_table(results, sys.stderr if args.json else sys.stdout)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 1 if missed_targets(results) else 0


if __name__ == "__main__":
    sys.exit(main())

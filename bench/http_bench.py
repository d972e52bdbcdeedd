"""HTTP load benchmark of one `twistd bearerbridge` process (see bench/README.md).

    .venv/bin/python bench/http_bench.py [--connections 16] [--duration 10] [--only NAME] [--json]

Starts the service from a throwaway config and SQLite database, seeds a user and clients
with the admin CLI (and single-use authorization codes straight into the store), then
drives three scenarios with wrk (C, its own process, so the load generator is not the
bottleneck: its CPU use is reported beside the server's) and prints requests/s, p50/p99
latency and errors per scenario. The server is always stopped by its PID at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from benchserver import BIN, BenchServer, cpu_seconds, folded_samples, machine_busy_seconds, record_profile

HERE = Path(__file__).resolve().parent
LUA = HERE / "post.lua"
REDIRECT_URI = "http://127.0.0.1:9/callback"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    min_rps: float      # the project's targets: one process, 2 cores, 16 connections
    max_p99_ms: float
    description: str
    code_scope: str | None = None  # a code exchange: the scope its codes are granted


SCENARIOS = (
    Scenario("client_credentials", "/token", 1500, 25, "POST /token grant_type=client_credentials, Basic auth"),
    Scenario("client_credentials_jwt", "/token", 800, 40,
             "the same for a client registered --token-format jwt: an ES256 RFC 9068 access token each"),
    Scenario("authorization_code", "/token", 800, 40,
             "POST /token grant_type=authorization_code + PKCE, one code each", code_scope="imap"),
    Scenario("openid_code", "/token", 500, 60,
             "the same with scope openid email imap: an ES256 ID token each", code_scope="openid email imap"),
    Scenario("introspection", "/introspect", 2600, 15, "POST /introspect token=<valid access token>, Basic auth"),
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts form-urlencoded before base64 (ours are URL-safe already).
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


# -- seeding ---------------------------------------------------------------------------------------

@dataclass
class Seed:
    username: str
    service: dict       # client_credentials, scope "metrics imap"
    jwt_service: dict   # the same, with JWT access tokens
    app: dict           # confidential code-grant client
    resource: dict      # resource server, for introspection
    access_token: str   # a valid user-bound access token to introspect


def seed(server: BenchServer) -> Seed:
    def client(*args: str) -> dict:
        return json.loads(server.cli("client", "create", "--name", f"bench-{secrets.token_hex(3)}", "--json", *args))

    username = f"bench-{secrets.token_hex(3)}"
    server.cli("user", "add", username, "--email", f"{username}@example.org", "--password-stdin",
               stdin="bench password\n")
    service = client("--scope", "metrics imap")
    jwt_service = client("--scope", "metrics imap", "--token-format", "jwt")
    app = client("--redirect-uri", REDIRECT_URI, "--scope", "openid email imap smtp")
    resource = client("--scope", "metrics", "--resource-server")
    token = server.cli("token", "issue", "--user", username, "--client", app["client_id"], "--scope", "imap")
    return Seed(username, service, jwt_service, app, resource, token)


def seed_codes(server: BenchServer, seeded: Seed, count: int, scope: str) -> list[str]:
    """`count` fresh single-use codes for `scope` with S256 challenges, granted by a password
    sign-in a minute ago; each returned as a ready form body."""
    from bearerbridge import bootstrap, config
    from bearerbridge.storage.models import SignIn
    store = bootstrap.open_store(config.load(server.config_path))
    try:
        with store.transaction():
            user = store.get_user_by_name(seeded.username)
            expires_at = int(time.time()) + 3600
            bodies = []
            for _ in range(count):
                code = secrets.token_urlsafe(32)
                verifier, challenge = pkce_pair()
                store.save_code(code, seeded.app["client_id"], user.id, REDIRECT_URI, scope,
                                challenge, "S256", expires_at, sign_in=SignIn(user, int(time.time()) - 60, ("pwd",)))
                bodies.append(urlencode({"grant_type": "authorization_code", "code": code,
                                         "code_verifier": verifier, "redirect_uri": REDIRECT_URI}))
    finally:
        store.engine.dispose()
    return bodies


# -- running wrk -----------------------------------------------------------------------------------

def preflight(url: str, authorization: str, body: str, expect: str) -> None:
    """One request by hand before the load: it must be a 200 whose JSON has `expect` truthy."""
    request = urllib.request.Request(url, data=body.encode(), method="POST", headers={
        "Authorization": authorization, "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"preflight {url}: HTTP {e.code}: {e.read()[:300]!r}") from None
    if not answer.get(expect):
        raise RuntimeError(f"preflight {url}: no {expect!r} in {answer}")


def run_wrk(url: str, authorization: str, mode: str, payload: str, connections: int, duration: float,
            wrk_threads: int, server_pid: int, profile: tuple[Path, str] | None = None) -> dict:
    out = tempfile.TemporaryFile(mode="w+")
    command = ["wrk", "-t", str(wrk_threads), "-c", str(connections), "-d", f"{duration:g}s",
               "--timeout", "5s", "-s", str(LUA), url, "--", authorization, mode, payload]
    spy = None
    if profile is not None:
        directory, name = profile
        spy = record_profile(server_pid, directory / f"{name}.folded", duration)
    server_cpu, machine_cpu = cpu_seconds(server_pid), machine_busy_seconds()
    started = time.monotonic()
    wrk = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _, status, usage = os.wait4(wrk.pid, 0)
    except BaseException:  # interrupted: stop our own children before the server goes
        for child in (wrk, spy):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        raise
    wrk.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(server_pid) - server_cpu
    machine_cpu = machine_busy_seconds() - machine_cpu
    if spy is not None:
        spy.wait(60)
    out.seek(0)
    text = out.read()
    lines = [line for line in text.splitlines() if line.startswith("BENCH-RESULT ")]
    if wrk.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({wrk.returncode}):\n{text}")
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    result["server_cpu_pct"] = 100 * server_cpu / wall
    result["wrk_cpu_pct"] = 100 * (usage.ru_utime + usage.ru_stime) / wall
    # Whatever else ran meanwhile (py-spy, other jobs): high values make the numbers suspect.
    result["other_cpu_pct"] = max(0.0, 100 * machine_cpu / wall - result["server_cpu_pct"] - result["wrk_cpu_pct"])
    return result


def summarize(scenario: Scenario, raw: dict) -> dict:
    seconds = raw["duration_us"] / 1e6
    socket_errors = sum(raw["socket_errors"].values())
    errors = raw["non200"] + socket_errors
    rps = raw["requests"] / seconds
    p50, p99 = raw["latency_us"]["p50"] / 1000, raw["latency_us"]["p99"] / 1000
    return {
        "scenario": scenario.name, "requests": raw["requests"], "seconds": round(seconds, 2),
        "rps": round(rps, 1), "p50_ms": round(p50, 2), "p90_ms": round(raw["latency_us"]["p90"] / 1000, 2),
        "p99_ms": round(p99, 2), "max_ms": round(raw["latency_us"]["max"] / 1000, 2),
        "errors": errors, "non200": raw["non200"], "statuses": raw["statuses"],
        "socket_errors": raw["socket_errors"], "error_samples": raw["samples"],
        "codes_exhausted": raw["exhausted"],
        "server_cpu_pct": round(raw["server_cpu_pct"], 1), "wrk_cpu_pct": round(raw["wrk_cpu_pct"], 1),
        "other_cpu_pct": round(raw["other_cpu_pct"], 1),
        "target": {"min_rps": scenario.min_rps, "max_p99_ms": scenario.max_p99_ms},
        "meets_target": rps >= scenario.min_rps and p99 <= scenario.max_p99_ms and errors == 0,
    }


# -- profiles --------------------------------------------------------------------------------------

# Frames every stack passes through (thread start-up, the reactor loop, the pool's plumbing):
# left out of the inclusive list so that it shows where the time actually goes.
PLUMBING = re.compile(r"\((threading|contextlib)\.py|\(twistd\)"
                      r"|twisted/(_threads|scripts|application|python/(log|context|threadpool))"
                      r"|twisted/internet/(base|epollreactor|posixbase|tcp)\.py|<module>")


def top_functions(folded: Path, limit: int = 15) -> str:
    """Self and inclusive shares of samples per function, from py-spy's raw (folded) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()
    total = 0
    for thread, frames, n in folded_samples(folded):
        per_thread[thread or "?"] += n
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            if not PLUMBING.search(frame):
                inclusive[frame] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples while a thread held the GIL"]
    lines += ["by thread:"] + [f"  {100 * n / total:5.1f}%  {t}" for t, n in per_thread.most_common(8)]
    lines += ["self time:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(limit)]
    lines += ["inclusive time:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(limit * 2)]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------

def print_table(results: list[dict], stream) -> None:
    header = (f"{'scenario':<20} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   "
              f"{'target':<18} {'ok':<3} {'server cpu':>10} {'wrk cpu':>7} {'other cpu':>9}")
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for r in results:
        target = f">={r['target']['min_rps']:g}/s p99<={r['target']['max_p99_ms']:g}"
        print(f"{r['scenario']:<20} {r['rps']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['errors']:>6}   "
              f"{target:<18} {'yes' if r['meets_target'] else 'NO':<3} {r['server_cpu_pct']:>9.0f}% "
              f"{r['wrk_cpu_pct']:>6.0f}% {r['other_cpu_pct']:>8.0f}%", file=stream)
    print(f"(cpu: % of one core over the run, {os.cpu_count()} cores; 'other' is everything else on the "
          f"machine, e.g. concurrent jobs, and should be near 0)", file=stream)
    for r in results:
        if r["errors"]:
            print(f"\n{r['scenario']}: {r['non200']} non-200 {r['statuses']}, socket errors {r['socket_errors']}",
                  file=stream)
            for sample in r["error_samples"]:
                print(f"  {sample}", file=stream)
        if r["codes_exhausted"]:
            print(f"{r['scenario']}: ran out of codes {r['codes_exhausted']} times; raise --codes-per-second",
                  file=stream)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", "-c", type=int, default=16, help="concurrent keep-alive connections")
    p.add_argument("--duration", "-d", type=float, default=10, help="seconds of load per scenario")
    p.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load before each scenario")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this scenario (a name or a unique prefix; repeatable): "
                        + ", ".join(s.name for s in SCENARIOS))
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (table on stderr)")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (1 is plenty; it leaves a core to the server)")
    p.add_argument("--threads", type=int, help="[database] threads of the server (default: the config's default)")
    p.add_argument("--codes-per-second", type=int, default=3000,
                   help="authorization codes seeded per second of the code scenario (each is used once)")
    p.add_argument("--profile", metavar="DIR", type=Path,
                   help="also record each scenario with py-spy (--gil) into DIR/NAME.folded and print its "
                        "hot spots; throughput is lower while profiling")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (config, database, log)")
    args = p.parse_args(argv)
    chosen = []
    for name in args.only or [s.name for s in SCENARIOS]:
        matches = [s for s in SCENARIOS if s.name == name] or [s for s in SCENARIOS if s.name.startswith(name)]
        if len(matches) != 1:
            p.error(f"--only {name!r}: expected one of {', '.join(s.name for s in SCENARIOS)}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    args.scenarios = chosen
    if args.profile and not (BIN / "py-spy").exists():
        p.error("--profile needs py-spy (.venv/bin/pip install py-spy)")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # py-spy from the venv
    args = parse_args(argv)
    if not shutil.which("wrk"):
        log("wrk is not installed (apt-get install wrk)")
        return 2
    # Let SIGTERM unwind through the `finally` below, so the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    directory = Path(tempfile.mkdtemp(prefix="bearerbridge-bench-"))
    server = BenchServer(directory, args.threads)
    results: list[dict] = []
    try:
        server.start()
        log(f"twistd pid {server.pid} on {server.url} (directory {directory})")
        seeded = seed(server)
        plans = {
            "client_credentials": (basic(seeded.service["client_id"], seeded.service["client_secret"]),
                                   "grant_type=client_credentials", "access_token"),
            "client_credentials_jwt": (basic(seeded.jwt_service["client_id"], seeded.jwt_service["client_secret"]),
                                       "grant_type=client_credentials", "access_token"),
            "introspection": (basic(seeded.resource["client_id"], seeded.resource["client_secret"]),
                              urlencode({"token": seeded.access_token}), "active"),
        }
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        for scenario in args.scenarios:
            url = server.url + scenario.path
            if scenario.code_scope is not None:
                authorization = basic(seeded.app["client_id"], seeded.app["client_secret"])
                needed = int(args.codes_per_second * (args.duration + args.warmup)) + 1
                started = time.monotonic()
                bodies = seed_codes(server, seeded, needed, scope=scenario.code_scope)
                log(f"seeded {needed} authorization codes in {time.monotonic() - started:.1f}s")
                preflight(url, authorization, bodies.pop(), "access_token")
                warm = int(args.codes_per_second * args.warmup)
                runs = {"warmup": bodies[:warm], "measure": bodies[warm:]}
                prefixes = {}
                for run, chunk in runs.items():
                    prefix = directory / f"codes-{run}"
                    for t in range(args.wrk_threads):
                        Path(f"{prefix}.{t + 1}").write_text("\n".join(chunk[t::args.wrk_threads]) + "\n")
                    prefixes[run] = str(prefix)
                load = {run: ("files", prefix) for run, prefix in prefixes.items()}
            else:
                authorization, body, expect = plans[scenario.name]
                preflight(url, authorization, body, expect)
                load = {"warmup": ("fixed", body), "measure": ("fixed", body)}
            if args.warmup > 0:
                run_wrk(url, authorization, *load["warmup"], args.connections, args.warmup,
                        args.wrk_threads, server.pid)
            log(f"{scenario.name}: {args.connections} connections for {args.duration:g}s")
            raw = run_wrk(url, authorization, *load["measure"], args.connections, args.duration,
                          args.wrk_threads, server.pid,
                          profile=(args.profile, scenario.name) if args.profile else None)
            results.append(summarize(scenario, raw))
            if args.profile:
                report = top_functions(args.profile / f"{scenario.name}.folded")
                (args.profile / f"{scenario.name}.top.txt").write_text(report + "\n")
                log(f"{scenario.name} profile:\n{report}")
    except Exception as e:
        log(f"failed: {e}")
        return 1
    finally:
        server.stop()
        if args.keep:
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print_table(results, sys.stderr if args.json else sys.stdout)
    if args.json:
        json.dump({"connections": args.connections, "duration": args.duration, "cpus": os.cpu_count(),
                   "results": results}, sys.stdout, indent=2)
        print()
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

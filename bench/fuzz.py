"""The long fuzzing run: the property tests of tests/sasl/test_fuzz.py and tests/web/test_fuzz.py,
with many more examples each than the suite runs.

    .venv/bin/python bench/fuzz.py [--examples 70000] [--jobs 2] [--only NAME]

Every `test_*` of those modules is a hypothesis property (the SASL parsers on any bytes, the
one-pass and the general OAUTHBEARER parsers agreeing, round trips, tokens never in an error,
the exchange, the Dovecot codec and a connection fed any lines, parse_query). Each runs here with
`--examples` examples (BEARERBRIDGE_FUZZ_EXAMPLES, read by the modules as they are imported), the
properties spread over `--jobs` processes. Prints, per property and in all: inputs run (calls of
the test body, counted here), crashes (properties that failed, each with hypothesis's smallest
failing example) and time. Exit status 1 if any property failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("tests.sasl.test_fuzz", "tests.web.test_fuzz")


def _properties() -> list[tuple[str, str]]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        found += [(name, attr) for attr in dir(module)
                  if attr.startswith("test_") and hasattr(getattr(module, attr), "hypothesis")]
    return found


def _run(target: tuple[str, str]) -> tuple[str, int, float, str | None]:
    """Run one property; return its name, inputs run, seconds, and the failure (or None)."""
    module_name, name = target
    test = getattr(importlib.import_module(module_name), name)
    inner = test.hypothesis.inner_test
    count = 0

    def counted(*args, **kwargs):  # hypothesis calls this replaceable attribute for every input
        nonlocal count
        count += 1
        return inner(*args, **kwargs)

    test.hypothesis.inner_test = counted
    started = time.perf_counter()
    try:
        test()
        failure = None
    except Exception:
        failure = traceback.format_exc()
    return f"{module_name.split('.')[1]}: {name}", count, time.perf_counter() - started, failure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=70_000, help="examples per property (default 70,000)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    p.add_argument("--only", action="append", default=[], help="run the properties whose name contains this")
    args = p.parse_args()
    os.environ["BEARERBRIDGE_FUZZ_EXAMPLES"] = str(args.examples)  # before the modules are imported
    os.environ.pop("CI", None)  # a long run wants new inputs, not CI's fixed ones
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    targets = [t for t in _properties() if not args.only or any(o in t[1] for o in args.only)]
    print(f"{len(targets)} properties x {args.examples:,} examples, {args.jobs} processes", flush=True)
    started = time.perf_counter()
    inputs = crashes = 0
    with ProcessPoolExecutor(args.jobs) as pool:  # each result printed as soon as it is known
        for done in as_completed([pool.submit(_run, target) for target in targets]):
            name, count, seconds, failure = done.result()
            inputs += count
            crashes += failure is not None
            print(f"{'FAILED' if failure else 'ok':6} {count:>9,} inputs {seconds:8.1f} s  {name}", flush=True)
            if failure:
                print(failure, flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"inputs: {inputs:,}  crashes: {crashes}  time: {minutes:.1f} min", flush=True)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()

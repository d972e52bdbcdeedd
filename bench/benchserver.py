"""What both benchmarks share: a throwaway `twistd bearerbridge` and CPU accounting.

Each benchmark starts one server from a generated config in a temporary directory, waits
until it answers, and stops it by its PID, whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle or waiting for I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def record_profile(pid: int, folded: Path, duration: float, gil: bool = True) -> subprocess.Popen:
    """Start `py-spy record` on `pid` for `duration` seconds, into `folded` (raw format); wait() on it.

    With `gil`, only the thread holding the GIL is sampled: in a CPU-bound Python server that
    is what costs."""
    folded.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(BIN / "py-spy"), "record", "--pid", str(pid), "--threads", "--function", "--nonblocking",
         "--rate", "200", *(["--gil"] if gil else []), "--duration", str(max(1, int(duration))),
         "--format", "raw", "-o", str(folded)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def folded_samples(folded: Path) -> Iterator[tuple[str | None, list[str], int]]:
    """(thread, frames outermost first, sample count) for each stack of py-spy's raw output."""
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith(("thread ", "process ")) else None
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if frames:
            yield thread, frames, int(count)


class BenchServer:
    """One `twistd -n bearerbridge` on SQLite and a free loopback port, plus `extra` TOML."""

    def __init__(self, directory: Path, threads: int | None, extra: str = "",
                 ready: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "bearerbridge.toml"
        self.log_path = directory / "twistd.log"
        database = f'[database]\nurl = "sqlite:///{directory / "bearerbridge.db"}"\n'
        if threads:
            database += f"threads = {threads}\n"
        self.config_path.write_text(
            f'[server]\nissuer = "{self.url}"\nsecret_key_file = "{directory / "secret.key"}"\n'
            f'[http]\nlisten = ["tcp:{self.port}:interface=127.0.0.1"]\n' + database + extra)
        self._ready = ready  # a further check after /healthz answers; raises OSError until ready
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.log_path),
             "bearerbridge", "--config", str(self.config_path)],
            cwd=self.directory, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        if self._ready is not None:
                            self._ready()
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it has not gone within 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            print(f"twistd (pid {self.process.pid}) ignored SIGTERM; killing it", file=sys.stderr)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cli(self, *args: str, stdin: str = "") -> str:
        """`bearerbridge --config ... ARGS` in-process (as tests/support.py does); its stdout."""
        from bearerbridge import cli

        out, err = io.StringIO(), io.StringIO()
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(["--config", str(self.config_path), *args])
        finally:
            sys.stdin = saved
        if status != 0:
            raise RuntimeError(f"bearerbridge {' '.join(args)}: {err.getvalue().strip()}")
        return out.getvalue().strip()

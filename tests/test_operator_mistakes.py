"""An operator's mistakes, each run as a real process: `bearerbridge ...` and `twistd bearerbridge`
answer with one line on stderr saying what and where, a non-zero exit status, and no traceback
anywhere (stdout, stderr, the log)."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bearerbridge.storage import migrations
from bearerbridge.storage.store import make_engine

from .support import BIN

TIMEOUT = 30  # seconds any one process may take; every mistake here is refused in one or two


def write_config(directory: Path, text: str = "", *, database: str | None = None, key: str | None = None,
                 listen: str = "tcp:0:interface=127.0.0.1") -> Path:
    """A config under `directory` with a database, a key and a listener of its own, plus `text`."""
    path = directory / "bearerbridge.toml"
    database = database or f"sqlite:///{directory / 'bb.db'}"
    path.write_text(f'[server]\nsecret_key_file = "{key or directory / "secret.key"}"\n'
                    f'[database]\nurl = "{database}"\n'
                    f'[http]\nlisten = ["{listen}"]\n{text}')
    return path


def run(argv: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run `argv` to its end within TIMEOUT seconds (killed past it: subprocess.run does so)."""
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)


def cli(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "bearerbridge"), "--config", str(config), *args], config.parent, stdin)


def twistd(config: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """`twistd -n bearerbridge --config CONFIG` with its log in a file: (the process, the log)."""
    log = config.parent / "twistd.log"
    done = run([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "bearerbridge",
                "--config", str(config)], config.parent)
    return done, log.read_text() if log.exists() else ""


def assert_one_line(done: subprocess.CompletedProcess[str], *expected: str, log: str = "",
                    status: int = 1) -> str:
    """Exactly one line on stderr naming each of `expected`, the exit status, and no traceback."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{done.stderr}"
    assert done.returncode == status, (done.returncode, done.stderr)
    for text in expected:
        assert text in lines[0], lines[0]
    for where, text in (("stdout", done.stdout), ("stderr", done.stderr), ("log", log)):
        assert "Traceback" not in text, f"a traceback in {where}:\n{text}"
    return lines[0]


def both(config: Path, *expected: str) -> None:
    """The CLI and twistd, given the same config, each refuse it in one line naming `expected`."""
    assert_one_line(cli(config, "user", "list"), *expected)
    done, log = twistd(config)
    line = assert_one_line(done, *expected, log=log)
    assert line.startswith("twistd bearerbridge: ")


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


# -- start-up: the same mistakes through the CLI and twistd ------------------------------------------------

def test_a_config_file_that_does_not_exist(tmp_path):
    both(tmp_path / "missing.toml", "missing.toml", "No such file or directory")


def test_a_config_file_that_is_not_toml(tmp_path):
    config = tmp_path / "bearerbridge.toml"
    config.write_text("[server\n")
    both(config, "bearerbridge.toml", "not valid TOML", "line 1")


def test_an_unknown_key(tmp_path):
    both(write_config(tmp_path, "[tokens]\naccess_tll = 60\n"), "[tokens] access_tll: unknown key")


def test_a_mysql_url_is_refused_as_unsupported(tmp_path):
    both(write_config(tmp_path, database="mysql://bb@127.0.0.1/bb"),
         "[database] url: a mysql:// URL is not supported", "sqlite:///", "postgresql+psycopg://")


def test_postgresql_that_does_not_answer(tmp_path):
    # Port 1 on loopback: nothing listens, so the connection is refused at once.
    both(write_config(tmp_path, database="postgresql+psycopg://bb:hunter2@127.0.0.1:1/bb"),
         "[database] url: cannot use postgresql+psycopg://bb:***@127.0.0.1:1/bb", "Connection refused")
    assert "hunter2" not in cli(write_config(tmp_path, database="postgresql+psycopg://bb:hunter2@127.0.0.1:1/bb"),
                                "user", "list").stderr


def test_a_key_directory_that_cannot_be_written(tmp_path):
    # A regular file where the key's directory should be: refused even to root, who may write anywhere.
    (tmp_path / "keys").write_text("not a directory\n")
    both(write_config(tmp_path, key=str(tmp_path / "keys" / "secret.key")),
         "[server] secret_key_file", str(tmp_path / "keys" / "secret.key"), "Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_key_directory(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o500)
    try:
        both(write_config(tmp_path, key=str(keys / "secret.key")),
             "[server] secret_key_file: cannot create", "Permission denied")
    finally:
        keys.chmod(0o700)


def test_a_database_file_in_a_directory_that_cannot_be_made(tmp_path):
    (tmp_path / "data").write_text("not a directory\n")
    both(write_config(tmp_path, database=f"sqlite:///{tmp_path / 'data' / 'bb.db'}"),
         "[database] url: cannot create", "data/bb.db")


def test_a_migration_that_refuses_names_equal_but_for_case(tmp_path):
    database = f"sqlite:///{tmp_path / 'bb.db'}"
    engine = make_engine(database, threads=1)
    migrations.upgrade(engine, "0002")
    with engine.begin() as connection:
        for name in ("alice", "Alice"):
            connection.execute(sa.text("INSERT INTO users (username, disabled, created_at) VALUES (:name, false, 0)"),
                               {"name": name})
    engine.dispose()
    config = write_config(tmp_path, database=database)
    both(config, "the schema cannot be brought up to date", "'alice' and 'Alice'", "rename or remove")
    # Nothing of the refused migration stayed behind: once the names differ, it runs.
    engine = sa.create_engine(database)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE users SET username = 'alice2' WHERE username = 'Alice'"))
    engine.dispose()
    listed = cli(config, "user", "list")
    assert listed.returncode == 0 and "alice2" in listed.stdout, listed.stderr


# -- twistd only ------------------------------------------------------------------------------------------

def test_an_http_port_in_use(tmp_path, port_in_use):
    done, log = twistd(write_config(tmp_path, listen=f"tcp:{port_in_use}:interface=127.0.0.1"))
    assert_one_line(done, f"[http] listen[0] 'tcp:{port_in_use}:interface=127.0.0.1'", "Address already in use",
                    log=log)
    assert "Address already in use" in log  # the log keeps it too


def test_a_sasl_socket_in_a_missing_directory(tmp_path):
    done, log = twistd(write_config(tmp_path, f'[sasl]\nlisten = ["unix:{tmp_path / "nowhere" / "auth"}"]\n'))
    assert_one_line(done, "[sasl] listen[0]", "cannot listen", "No such file or directory", log=log)


def test_an_endpoint_twisted_cannot_parse(tmp_path):
    done, log = twistd(write_config(tmp_path, listen="carrier-pigeon:80"))
    assert_one_line(done, "[http] listen[0]: bad endpoint 'carrier-pigeon:80'", log=log)
    assert done.stdout == ""  # not twistd's usage text: a config is not a usage mistake


def test_a_tls_key_that_does_not_exist(tmp_path):
    done, log = twistd(write_config(tmp_path, listen="ssl:0:privateKey=missing.pem"))
    assert_one_line(done, "[http] listen[0]: bad endpoint", "missing.pem", log=log)


def test_an_access_log_that_cannot_be_written(tmp_path):
    (tmp_path / "logs").write_text("not a directory\n")
    done, log = twistd(write_config(tmp_path, f'access_log = "{tmp_path / "logs" / "access.log"}"\n'))
    assert_one_line(done, "[http] access_log: cannot write", "logs/access.log", log=log)


# -- the CLI only -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["token", "revoke", "--client", "nope"], "no client 'nope'"),
    (["token", "revoke", "--user", "nope"], "no user 'nope'"),
    (["user", "disable", "nobody"], "no user 'nobody'"),
])
def test_revoking_for_what_does_not_exist(tmp_path, args, message):
    done = cli(write_config(tmp_path), *args)
    assert assert_one_line(done, message) == f"bearerbridge: {message}"
    assert done.stdout == ""


def test_a_password_prompt_without_a_terminal_points_to_password_stdin(tmp_path):
    done = run([str(BIN / "bearerbridge"), "--config", str(write_config(tmp_path)), "user", "add", "bob"],
               tmp_path)
    if "Password:" in done.stderr:  # this test itself has a terminal that getpass found
        pytest.skip("run with a controlling terminal: getpass reads from it")
    assert_one_line(done, "no terminal", "--password-stdin")


@pytest.mark.parametrize("key, status, message", [
    (b"\x03", 130, "bearerbridge: interrupted"),                          # Ctrl-C
    (b"\x04", 1, "bearerbridge: no password given (the input ended)"),    # Ctrl-D
])
def test_ctrl_c_or_ctrl_d_at_the_password_prompt(tmp_path, key, status, message):
    """The CLI runs on a pseudo-terminal of its own, as an operator's shell gives it, and the key
    is typed there: the terminal turns Ctrl-C into SIGINT and Ctrl-D into the end of input."""
    config = write_config(tmp_path)
    master, slave = os.openpty()
    process = subprocess.Popen(
        [str(BIN / "bearerbridge"), "--config", str(config), "user", "add", "bob"], cwd=tmp_path,
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    try:
        prompt, deadline = b"", time.monotonic() + TIMEOUT
        while b"Password: " not in prompt:
            assert time.monotonic() < deadline and process.poll() is None, f"no prompt: {prompt!r}"
            if select.select([master], [], [], 0.1)[0]:
                prompt += os.read(master, 1024)
        os.write(master, key)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert assert_one_line(done, status=status) == message
    assert "bob" not in cli(config, "user", "list").stdout

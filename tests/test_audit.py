"""audit.py: the line format, the file (mode, appending, whole lines from many writers, nothing
lost when the writer goes), the refusal of secrets, and what becomes of a file that cannot be written."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bearerbridge import tap
from bearerbridge.audit import AuditLog, open_audit_log
from bearerbridge.config import AuditSettings, ConfigError

SRC = str(Path(__file__).parent.parent / "src")


def lines_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def test_an_event_is_one_json_line_with_its_time_in_utc_to_the_millisecond(tmp_path):
    log = open_audit_log(AuditSettings(file=str(tmp_path / "audit.log")))
    before = time.time()
    log.record("consent", user="alice\nbob", client_id="web", scope="imap smtp", approved=True, address=None,
               scopes=["imap", "smtp"], token_id=7)
    text = (tmp_path / "audit.log").read_text()
    assert text.count("\n") == 1 and text.endswith("\n")  # a newline in a value is escaped
    event = json.loads(text)
    assert list(event)[:2] == ["time", "event"]
    assert event == {"time": event["time"], "event": "consent", "user": "alice\nbob", "client_id": "web",
                     "scope": "imap smtp", "approved": True, "scopes": ["imap", "smtp"], "token_id": 7}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    written = time.mktime(time.strptime(event["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 1 <= written <= time.time()


def test_the_file_is_created_mode_0600_with_its_directory_and_appended_to(tmp_path):
    path = tmp_path / "logs" / "audit.log"
    open_audit_log(AuditSettings(file=str(path))).record("sign_in", user="alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    open_audit_log(AuditSettings(file=str(path))).record("sign_in", user="bob")
    assert [e["user"] for e in lines_of(path)] == ["alice", "bob"]


@pytest.mark.parametrize("name", ["password", "secret", "token", "code", "refresh_token", "access_token",
                                  "client_secret", "device_code", "user_code", "code_verifier", "password_hash",
                                  "new_password", "secret_key", "cookie", "session_cookie", "code_digest",
                                  "time", "Token", "user-name"])
def test_a_field_named_like_a_secret_or_not_snake_case_is_refused_and_nothing_is_written(tmp_path, name):
    path = tmp_path / "audit.log"
    log = open_audit_log(AuditSettings(file=str(path)))
    with pytest.raises(ValueError, match=repr(name)):
        log.record("token_issued", user="alice", **{name: "s3cret"})
    with pytest.raises(ValueError, match="is not a snake_case name"):
        log.record("Token issued", user="alice")
    assert path.read_text() == ""


def test_row_ids_and_the_usual_names_are_welcome():
    log = AuditLog(None)
    log.record("token_revoked", token_id=1, previous_token_id=2, family="f", token_type="refresh_token",
               grant_type="authorization_code", client_id="c", client_name="App", user="u", scope="imap",
               address="192.0.2.7", reason="wrong_password", revoked=2, action="user add", actor="root",
               outcome="done", sessions_ended=0)


def test_without_a_file_events_are_checked_and_dropped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = open_audit_log(AuditSettings(file=""))
    log.record("sign_in", user="alice")
    with pytest.raises(ValueError):
        log.record("sign_in", password="hunter2")
    assert list(tmp_path.iterdir()) == []


def test_threads_sharing_a_log_and_two_logs_on_one_file_keep_every_line_whole(tmp_path):
    path = tmp_path / "audit.log"
    logs = [open_audit_log(AuditSettings(file=str(path))) for _ in range(2)]
    long = ["x" * 100] * 50  # lines of 5 KB, above PIPE_BUF: whole all the same

    def write(log: AuditLog, n: int) -> None:
        for i in range(200):
            log.record("token_issued", writer=n, n=i, scopes=long)
    threads = [threading.Thread(target=write, args=(logs[n % 2], n)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = lines_of(path)
    assert len(events) == 800
    for n in range(4):
        assert [e["n"] for e in events if e["writer"] == n] == list(range(200))


WRITER = """
import os, signal, sys
from bearerbridge.audit import open_audit_log
from bearerbridge.config import AuditSettings
log = open_audit_log(AuditSettings(file=sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.record("admin", writer=sys.argv[2], n=i, scopes=["x" * 100] * 50)
if sys.argv[4] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def writer(path: Path, name: str, count: int, end: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(count), end],
                            env={**os.environ, "PYTHONPATH": SRC})


def test_two_processes_appending_at_once_keep_every_line_whole(tmp_path):
    path = tmp_path / "audit.log"
    processes = [writer(path, name, 1000, "exit") for name in ("service", "cli")]
    assert [p.wait(30) for p in processes] == [0, 0]
    events = lines_of(path)
    for name in ("service", "cli"):
        assert [e["n"] for e in events if e["writer"] == name] == list(range(1000))


def test_the_file_holds_every_line_after_the_log_is_dropped_or_its_process_killed(tmp_path):
    path = tmp_path / "audit.log"
    log = open_audit_log(AuditSettings(file=str(path)))
    for i in range(3):
        log.record("sign_in", n=i)
    assert len(lines_of(path)) == 3  # nothing waits in a buffer
    del log
    assert len(lines_of(path)) == 3
    killed = writer(path, "killed", 500, "kill")
    assert killed.wait(30) == -9
    assert [e["n"] for e in lines_of(path)[3:]] == list(range(500))


def test_a_failed_write_is_complained_of_once_counted_and_never_raised(tmp_path):
    complaints: list[str] = []
    fd = os.open("/dev/full", os.O_WRONLY | os.O_APPEND)
    log = AuditLog(fd, "/var/log/audit.log", complaints.append)
    for _ in range(3):
        log.record("sign_in", user="alice")  # no exception: the request goes on
    assert log.lost == 3
    assert complaints == ["[audit] file: cannot write /var/log/audit.log: No space left on device; "
                          "security events are being lost"]
    good = os.open(tmp_path / "audit.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(good, fd)  # the disk has room again
    log.record("sign_in", user="bob")
    assert complaints[1:] == ["[audit] file: /var/log/audit.log is written again; 3 event(s) lost in all"]
    assert [e["user"] for e in lines_of(tmp_path / "audit.log")] == ["bob"]
    log.close()
    os.close(good)


@pytest.mark.parametrize("where, reason", [("", "Is a directory"), ("file/audit.log", "Not a directory")])
def test_a_file_that_cannot_be_opened_is_one_config_error_naming_the_key(tmp_path, where, reason):
    (tmp_path / "file").write_text("")
    path = str(tmp_path / where) if where else str(tmp_path)
    with pytest.raises(ConfigError) as raised:
        open_audit_log(AuditSettings(file=path))
    assert str(raised.value).startswith("[audit] file: cannot write ") and reason in str(raised.value)


def test_twistd_refuses_to_start_with_an_audit_log_it_cannot_open_in_one_line(tmp_path):
    path = tmp_path / "bearerbridge.toml"
    path.write_text(f'[server]\nsecret_key_file = "{tmp_path / "key"}"\n[database]\nurl = "sqlite:///bb.db"\n'
                    f'[audit]\nfile = "{tmp_path}"\n')
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as stopped:
        tap.makeService(options)
    assert str(stopped.value) == f"twistd bearerbridge: [audit] file: cannot write {tmp_path}: Is a directory"
    assert not (tmp_path / "bb.db").exists()  # refused before the database is touched


def test_a_record_costs_microseconds(tmp_path):
    """The cost that audit.py's comment states: a record with eight fields, JSON and write included."""
    log = open_audit_log(AuditSettings(file=str(tmp_path / "audit.log")))
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        log.record("token_issued", grant_type="authorization_code", client_id="3f2a9c1e" * 4, user="alice",
                   scope="imap smtp", token_id=i, family="9c1e3f2a" * 4, address="192.0.2.7")
    per_record = (time.perf_counter() - start) / n
    assert per_record < 500e-6, f"{per_record * 1e6:.1f} µs a record"


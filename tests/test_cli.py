"""The operator's command line, against the running service's database."""

from __future__ import annotations

import base64
import getpass
import io
import json
import sqlite3
import subprocess
import time

import pytest

from bearerbridge import cli

from .support import BIN, CliError, get_code, introspect, token_request


def test_console_script_creates_a_client_with_a_secret_shown_once(service):
    result = subprocess.run([str(BIN / "bearerbridge"), "--config", str(service.config_path), "client", "create",
                             "--name", "Library", "--redirect-uri", "https://library.example/cb"],
                            capture_output=True, text=True, check=True)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    shown = json.loads(service.cli("client", "show", lines["client_id"]))
    assert shown["name"] == "Library" and shown["grant_types"] == ["authorization_code", "refresh_token"]
    assert lines["client_secret"] not in json.dumps(shown)
    assert lines["client_id"] in service.cli("client", "list")


def test_users(service):
    name, password = service.user()
    assert f"{name}\t-\tenabled" in service.cli("user", "list")
    service.cli("user", "passwd", name, "--password-stdin", stdin="new password\n")
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    with pytest.raises(AssertionError):
        get_code(service, client, name, password)  # the old password no longer works
    get_code(service, client, name, "new password")
    service.cli("user", "disable", name)
    assert f"{name}\t-\tdisabled" in service.cli("user", "list")
    service.cli("user", "enable", name)
    assert f"{name}\t-\tenabled" in service.cli("user", "list")
    with pytest.raises(CliError, match="exists already"):
        service.cli("user", "add", name, "--password-stdin", stdin="x\n")
    with pytest.raises(CliError, match="empty password"):
        service.cli("user", "add", "someone", "--password-stdin", stdin="\n")


def soon_inactive(service, resource_server, token):
    """The CLI is another process: the service notices its changes within [sasl] cache_ttl (1 s)."""
    start = time.monotonic()
    while introspect(service, resource_server, token)["active"]:
        assert time.monotonic() - start < 1.2, "a revocation by the CLI went unnoticed for over 1.2 s"
        time.sleep(0.05)


def test_operator_issued_token_and_revocations(service, resource_server):
    name, _ = service.user()
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap smtp")
    issued = json.loads(service.cli("token", "issue", "--user", name, "--client", client["client_id"],
                                    "--scope", "smtp", "--ttl", "120", "--json"))
    assert issued["expires_in"] == 120 and issued["token_type"] == "Bearer"
    claims = introspect(service, resource_server, issued["access_token"])
    assert claims["active"] and claims["username"] == name and claims["scope"] == "smtp"
    assert service.cli("token", "revoke", issued["access_token"]) == "revoked 1 token(s)"
    soon_inactive(service, resource_server, issued["access_token"])

    plain = service.cli("token", "issue", "--user", name, "--client", client["client_id"], "--scope", "imap")
    assert "revoked 1 token(s)" in service.cli("token", "revoke", "--user", name)
    soon_inactive(service, resource_server, plain)
    again = service.cli("token", "issue", "--user", name, "--client", client["client_id"], "--scope", "imap")
    service.cli("token", "revoke", "--client", client["client_id"])
    soon_inactive(service, resource_server, again)


@pytest.mark.parametrize("args, message", [
    (["client", "create", "--name", "x", "--public", "--grant", "client_credentials"], "public client"),
    (["client", "create", "--name", "x", "--grant", "authorization_code"], "needs at least one --redirect-uri"),
    (["client", "create", "--name", "x", "--grant", "client_credentials"], "name the scopes"),
    (["client", "create", "--name", "x", "--redirect-uri", "https://a.example/cb", "--scope", "root"], "unknown scope"),
    (["client", "create", "--name", "x", "--redirect-uri", "http://a.example/cb"], "plain http"),
    (["client", "create", "--name", "x", "--redirect-uri", "https://a.example/cb#frag"], "no fragment"),
    (["client", "show", "nope"], "no client"),
    (["client", "delete", "nope"], "no client"),
    (["token", "revoke", "not-a-token"], "no such token"),
    (["token", "revoke", "--client", "nope"], "no client 'nope'"),
    (["token", "revoke", "--user", "nope"], "no user 'nope'"),
    (["token", "issue", "--user", "nobody", "--client", "x", "--scope", "imap"], "no enabled user"),
    (["user", "disable", "nobody"], "no user"),
])
def test_refusals(service, args, message):
    with pytest.raises(CliError, match=message):
        service.cli(*args)


def test_a_public_client_has_no_secret(service):
    created = service.client("--public", "--redirect-uri", "http://127.0.0.1/cb")
    assert created["client_secret"] is None and created["public"] is True
    response = token_request(service, {"grant_type": "client_credentials"}, created)
    assert response.status_code == 401


# -- in process, on a database of its own ---------------------------------------------------------------

@pytest.fixture
def run(tmp_path, capsys):
    """run(*argv) -> (exit status, stdout, stderr) of `bearerbridge --config ... *argv`."""
    config = tmp_path / "bearerbridge.toml"
    config.write_text(f'[server]\nsecret_key_file = "{tmp_path / "key"}"\n'
                      f'[database]\nurl = "sqlite:///{tmp_path / "bb.db"}"\n')

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli.main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run


def test_a_client_gets_no_operator_scope_unless_named(run):
    status, out, _ = run("client", "create", "--name", "App", "--redirect-uri", "https://app.example/cb", "--json")
    assert status == 0 and "metrics" not in json.loads(out)["scope"].split()
    status, out, _ = run("client", "create", "--name", "Prometheus", "--scope", "metrics", "--json")
    assert status == 0 and json.loads(out)["scope"] == "metrics"


def test_token_issue_keeps_to_the_clients_scopes_and_a_positive_lifetime(run):
    _, out, _ = run("client", "create", "--name", "App", "--redirect-uri", "https://app.example/cb",
                    "--scope", "imap", "--json")
    client_id = json.loads(out)["client_id"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO("a long passphrase\n"))
        assert run("user", "add", "carol", "--password-stdin")[0] == 0
    status, _, err = run("token", "issue", "--user", "carol", "--client", client_id, "--scope", "imap smtp")
    assert status == 1 and "not registered for smtp" in err
    status, _, err = run("token", "issue", "--user", "carol", "--client", client_id, "--scope", "imap", "--ttl", "0")
    assert status == 1 and "--ttl must be a positive number of seconds" in err
    status, out, _ = run("token", "issue", "--user", "carol", "--client", client_id, "--scope", "imap", "--json")
    assert status == 0 and json.loads(out)["scope"] == "imap"


@pytest.mark.parametrize("uri", ["http://evil.example\\@127.0.0.1:1234/cb", "https://app.example/cb#x",
                                 "http://app.example/cb", "https://app.example/c b"])
def test_a_redirect_uri_with_two_readings_cannot_be_registered(run, uri):
    status, _, err = run("client", "create", "--name", "App", "--redirect-uri", uri)
    assert status == 1 and "redirect URI" in err


def test_only_a_client_marked_resource_server_may_introspect_others_tokens(run):
    status, out, _ = run("client", "create", "--name", "IMAP", "--scope", "imap", "--resource-server", "--json")
    assert status == 0 and json.loads(out)["resource_server"] is True
    client_id = json.loads(out)["client_id"]
    assert run("client", "update", client_id, "--no-resource-server")[0] == 0
    assert json.loads(run("client", "show", client_id)[1])["resource_server"] is False
    status, _, err = run("client", "update", "nobody", "--resource-server")
    assert status == 1 and "no client 'nobody'" in err
    status, _, err = run("client", "create", "--name", "x", "--public", "--redirect-uri", "http://127.0.0.1/cb",
                         "--resource-server")
    assert status == 1 and "cannot be a resource server" in err


def test_disabling_a_user_says_what_it_ended(run):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO("a long passphrase\nanother one\n"))
        assert run("user", "add", "Carol", "--password-stdin")[0] == 0
        status, _, err = run("user", "add", "CAROL", "--password-stdin")
    assert status == 1 and "exists already" in err
    status, out, _ = run("user", "disable", "carol")  # names are found whatever their case
    assert status == 0 and "0 browser session(s) ended and 0 token(s) revoked" in out


def test_every_client_must_use_pkce_unless_a_confidential_one_is_let_off(run):
    status, out, _ = run("client", "create", "--name", "App", "--redirect-uri", "https://app.example/cb", "--json")
    created = json.loads(out)
    assert status == 0 and created["pkce_required"] is True
    status, out, _ = run("client", "create", "--name", "Legacy", "--redirect-uri", "https://old.example/cb",
                         "--no-pkce", "--json")
    assert status == 0 and json.loads(out)["pkce_required"] is False
    status, out, _ = run("client", "update", created["client_id"], "--no-pkce")
    assert status == 0 and json.loads(out)["pkce_required"] is False
    assert json.loads(run("client", "show", created["client_id"])[1])["pkce_required"] is False
    status, _, err = run("client", "create", "--name", "Native", "--public", "--redirect-uri",
                         "http://127.0.0.1/cb", "--no-pkce")
    assert status == 1 and "must use PKCE" in err
    _, out, _ = run("client", "create", "--name", "Native", "--public", "--redirect-uri", "http://127.0.0.1/cb",
                    "--json")
    status, _, err = run("client", "update", json.loads(out)["client_id"], "--no-pkce")
    assert status == 1 and "must use PKCE" in err


def test_openid_settings_of_a_client_and_a_user_are_registered_and_checked(run, tmp_path, monkeypatch):
    status, out, _ = run("client", "create", "--name", "RP", "--redirect-uri", "https://rp.example/cb",
                         "--id-token-alg", "RS256", "--post-logout-redirect-uri", "https://rp.example/bye", "--json")
    created = json.loads(out)
    assert status == 0 and created["id_token_alg"] == "RS256"
    assert created["post_logout_redirect_uris"] == ["https://rp.example/bye"]
    assert {"openid", "profile", "email"} <= set(created["scope"].split())
    shown = json.loads(run("client", "show", created["client_id"])[1])
    assert (shown["id_token_alg"], shown["post_logout_redirect_uris"]) == ("RS256", ["https://rp.example/bye"])
    _, out, _ = run("client", "create", "--name", "Default", "--redirect-uri", "https://rp.example/cb", "--json")
    assert json.loads(out)["id_token_alg"] == "ES256"
    with pytest.raises(SystemExit):  # argparse's refusal: "invalid choice: 'none'"
        run("client", "create", "--name", "X", "--redirect-uri", "https://rp.example/cb", "--id-token-alg", "none")
    status, _, err = run("client", "create", "--name", "X", "--redirect-uri", "https://rp.example/cb",
                         "--post-logout-redirect-uri", "https://rp.example/bye#x")
    assert status == 1 and "https://rp.example/bye#x" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("a password\n"))
    status, _, _ = run("user", "add", "alice", "--display-name", "Alice Liddell", "--password-stdin")
    with sqlite3.connect(tmp_path / "bb.db") as db:
        assert status == 0 and db.execute("SELECT display_name FROM users").fetchall() == [("Alice Liddell",)]


# -- the audit log: every change, by whom, never a secret ---------------------------------------------

def audit_events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "var" / "audit.log").read_text().splitlines()]


def test_every_change_is_recorded_with_who_made_it_and_no_secret(run, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO("first passphrase\nsecond passphrase\n"))
        run("user", "add", "carol", "--password-stdin")
        run("user", "passwd", "carol", "--password-stdin")
    created = json.loads(run("client", "create", "--name", "App", "--redirect-uri", "https://app.example/cb",
                             "--scope", "imap", "--json")[1])
    client_id = created["client_id"]
    run("client", "update", client_id, "--no-pkce")
    token = run("token", "issue", "--user", "carol", "--client", client_id, "--scope", "imap")[1].strip()
    run("token", "revoke", token)
    run("token", "revoke", "--user", "carol")
    run("user", "disable", "carol")
    run("user", "enable", "carol")
    run("token", "revoke", "--client", client_id)
    run("client", "delete", client_id)
    run("db", "upgrade")
    for listing in (("user", "list"), ("client", "list"), ("client", "show", client_id)):
        run(*listing)  # reading changes nothing: not recorded

    events = audit_events(tmp_path)
    assert [e["action"] for e in events] == [
        "user add", "user passwd", "client create", "client update", "token issue", "token revoke", "token revoke",
        "user disable", "user enable", "token revoke", "client delete", "db upgrade"]
    assert {(e["event"], e["actor"], e["outcome"]) for e in events} == {("admin", getpass.getuser(), "done")}
    assert all(e.get("user") == "carol" for e in events if e["action"].startswith("user"))
    assert events[2]["client_id"] == client_id and events[2]["client_name"] == "App"
    assert events[2]["redirect_uris"] == ["https://app.example/cb"] and events[2]["public"] is False
    assert events[3]["pkce_required"] is False and "resource_server" not in events[3]  # only what changed
    issued = events[4]
    assert (issued["user"], issued["client_id"], issued["scope"]) == ("carol", client_id, "imap")
    assert events[5]["token_id"] == issued["token_id"] and events[5]["revoked"] == 1
    assert events[6]["revoked"] == 0 and events[9]["client_id"] == client_id
    text = (tmp_path / "var" / "audit.log").read_text()
    for secret in ("first passphrase", "second passphrase", created["client_secret"], token):
        assert secret not in text


def test_a_refused_change_is_recorded_with_its_reason_and_never_the_token_it_named(run, tmp_path):
    assert run("client", "delete", "nope")[0] == 1
    assert run("token", "revoke", "a-token-no-one-has")[0] == 1
    assert run("user", "disable", "nobody")[0] == 1
    refused = audit_events(tmp_path)
    assert [(e["action"], e["outcome"], e["reason"]) for e in refused] == [
        ("client delete", "refused", "no client 'nope'"), ("token revoke", "refused", "no such token"),
        ("user disable", "refused", "no user 'nobody'")]
    assert refused[0]["client_id"] == "nope" and refused[2]["user"] == "nobody"
    assert "a-token-no-one-has" not in (tmp_path / "var" / "audit.log").read_text()


def test_without_an_audit_log_no_change_is_made_but_reading_works(tmp_path, capsys):
    config = tmp_path / "bearerbridge.toml"
    config.write_text(f'[server]\nsecret_key_file = "{tmp_path / "key"}"\n'
                      f'[database]\nurl = "sqlite:///{tmp_path / "bb.db"}"\n[audit]\nfile = "{tmp_path}"\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO("a long passphrase\n"))
        assert cli.main(["--config", str(config), "user", "add", "carol", "--password-stdin"]) == 1
    assert capsys.readouterr().err == f"bearerbridge: [audit] file: cannot write {tmp_path}: Is a directory\n"
    assert cli.main(["--config", str(config), "user", "list"]) == 0
    assert "carol" not in capsys.readouterr().out


def test_keys_list_shows_the_signing_keys_and_keys_rotate_promotes_the_next_ones(run, tmp_path):
    status, listed, _ = run("keys", "list")
    assert status == 0
    rows = [line.split() for line in listed.splitlines()]
    assert sorted((row[1], row[2]) for row in rows) == [
        ("ES256", "current"), ("ES256", "next"), ("RS256", "current"), ("RS256", "next")]
    upcoming = {row[0] for row in rows if row[2] == "next"}
    status, out, _ = run("keys", "rotate")
    assert status == 0 and "now signing with" in out and all(kid in out for kid in upcoming)
    _, listed, _ = run("keys", "list")
    stages = {line.split()[0]: line.split()[2] for line in listed.splitlines()}
    assert {kid for kid, stage in stages.items() if stage == "current"} == upcoming
    assert sum(stage == "retired" for stage in stages.values()) == 2 and "published until" in listed
    assert [(e["action"], sorted(e["kids"])) for e in audit_events(tmp_path)] == [("keys rotate", sorted(upcoming))]


def test_keys_dovecot_writes_every_published_public_key_where_dovecot_looks_and_removes_old_ones(run, tmp_path):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    directory = tmp_path / "dovecot-keys"
    stale = directory / "default" / "ES256" / "gone-kid"
    stale.parent.mkdir(parents=True)
    stale.write_text("an old key")
    status, out, _ = run("keys", "dovecot", str(directory))
    assert status == 0 and "wrote 4 key(s)" in out and "removed 1" in out and not stale.exists()
    _, listed, _ = run("keys", "list")
    for line in listed.splitlines():
        kid, alg = line.split()[:2]
        key_file = directory / "default" / alg / kid
        assert load_pem_public_key(key_file.read_bytes()) and "PRIVATE" not in key_file.read_text()
        assert oct(key_file.stat().st_mode & 0o777) == "0o644"
    assert not list(directory.rglob("*.partial"))


def test_token_issue_gives_a_jwt_client_a_jwt_living_no_longer_than_access_ttl(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a password\n"))
    run("user", "add", "alice", "--email", "alice@example.org", "--password-stdin")
    _, out, _ = run("client", "create", "--name", "Mail", "--redirect-uri", "https://mail.example/cb",
                    "--scope", "imap", "--token-format", "jwt", "--json")
    client_id = json.loads(out)["client_id"]
    status, out, _ = run("token", "issue", "--user", "alice", "--client", client_id, "--scope", "imap",
                         "--ttl", "600", "--json")
    issued = json.loads(out)
    header, claims = (json.loads(base64.urlsafe_b64decode(part + "==")) for part in
                      issued["access_token"].split(".")[:2])
    assert status == 0 and header["typ"] == "at+jwt" and claims["exp"] - claims["iat"] == 600
    assert (claims["client_id"], claims["scope"], claims["email"]) == (client_id, "imap", "alice@example.org")
    status, _, err = run("token", "issue", "--user", "alice", "--client", client_id, "--scope", "imap",
                         "--ttl", "3601")
    assert status == 1 and "at most [tokens] access_ttl" in err


# -- the admin role: who may use /admin ------------------------------------------------------------

def test_the_first_user_on_an_empty_database_is_an_admin_and_others_only_when_named(run, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one passphrase\ntwo passphrase\nthree passphrase\n"))
    assert run("user", "add", "root", "--password-stdin")[1] == "added user root (the first user: an admin)\n"
    assert run("user", "add", "carol", "--password-stdin")[1] == "added user carol\n"
    assert run("user", "add", "dave", "--admin", "--password-stdin")[1] == "added user dave (an admin)\n"
    assert run("user", "list")[1].splitlines() == [
        "carol\t-\tenabled\t-", "dave\t-\tenabled\tadmin", "root\t-\tenabled\tadmin"]
    assert run("user", "admin", "Carol", "--admin") == (0, "Carol is now an admin (may use /admin)\n", "")
    assert run("user", "admin", "root", "--no-admin")[0] == 0
    with sqlite3.connect(tmp_path / "bb.db") as db:
        assert dict(db.execute("SELECT username, is_admin FROM users")) == {"root": 0, "carol": 1, "dave": 1}
    status, _, err = run("user", "admin", "nobody", "--admin")
    assert status == 1 and "no user 'nobody'" in err
    with pytest.raises(SystemExit):  # argparse: one of --admin and --no-admin is required
        run("user", "admin", "carol")
    assert [(e["action"], e["user"], e.get("is_admin"), e["outcome"]) for e in audit_events(tmp_path)] == [
        ("user add", "root", True, "done"), ("user add", "carol", False, "done"), ("user add", "dave", True, "done"),
        ("user admin", "Carol", True, "done"), ("user admin", "root", False, "done"),
        ("user admin", "nobody", None, "refused")]

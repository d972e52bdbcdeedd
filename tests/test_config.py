"""Reading the TOML config: defaults, the documented example, and refusals that name the key."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest
from twisted.python import usage

from bearerbridge import config, tap
from bearerbridge.config import SaslSettings

EXAMPLE = Path(__file__).parent.parent / "conf" / "bearerbridge.toml"


def test_defaults():
    defaults = config.Config()
    assert defaults.http.listen == ("tcp:8080:interface=127.0.0.1",)
    assert defaults.database.url == "sqlite:///var/bearerbridge.db"
    assert (defaults.tokens.access_ttl, defaults.tokens.refresh_ttl, defaults.tokens.code_ttl) == (3600, 2592000, 600)
    assert "imap" in defaults.scopes and not defaults.https


def test_the_documented_example_is_valid_and_complete():
    data = tomllib.loads(EXAMPLE.read_text())
    loaded = config.parse(data)
    known = config.Config()
    sections = {name: getattr(known, name) for name in known.__dataclass_fields__ if name != "scopes"}
    for name, settings in list(sections.items()):  # a section of sections: [throttle.sign_in], ...
        if all(dataclasses.is_dataclass(value) for value in vars(settings).values()):
            del sections[name]
            sections.update({f"{name}.{inner}": value for inner, value in vars(settings).items()})
    assert {"server", "openid", "pages", "throttle.sign_in"} <= set(sections)
    for section, settings in sections.items():
        outer, _, inner = section.partition(".")
        documented = set(data[outer][inner] if inner else data[outer])
        assert documented == set(settings.__dataclass_fields__), f"[{section}] in conf/bearerbridge.toml"
    assert loaded.scopes
    assert loaded == config.Config()  # every documented value is the default it says it is


def test_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nsite_name = "Mail of Example"\n')
    monkeypatch.setenv(config.ENV_VAR, str(path))
    assert config.load().server.site_name == "Mail of Example"
    monkeypatch.delenv(config.ENV_VAR)
    assert config.load().server.site_name == "bearerbridge"


@pytest.mark.parametrize("text, message", [
    ("[server]\nissuer = 3\n", "[server] issuer: expected a non-empty string"),
    ("[server]\nisuer = 'x'\n", "[server] isuer: unknown key"),
    ("[srever]\n", "[srever]: unknown section"),
    ("[tokens]\naccess_ttl = -5\n", "[tokens] access_ttl: expected a positive integer"),
    ("[tokens]\ncode_ttl = true\n", "[tokens] code_ttl: expected a positive integer"),
    ("[http]\nlisten = 'tcp:80'\n", "[http] listen: expected a list of strings"),
    ("[http]\nlisten = []\n", "[http] listen: name at least one endpoint"),
    ("[sasl.services]\nimap = 'mail'\n", "[sasl.services] imap: scope 'mail' is not in [scopes]"),
    ("[sasl]\nidentity = ['uid']\n", "[sasl] identity: 'uid' is not one of"),
    ("[sasl]\nidentity = ['user@realm']\n", "[sasl] realm: needed"),
    ("[sasl]\nplain = ['pop3']\n", "[sasl] plain: 'pop3' is not one of"),
    ("[sasl]\ncache_ttl = 0\n", "[sasl] cache_ttl: expected a positive number"),
    ("[http]\nlisten = ['tcp:80', 5]\n", "[http] listen[1]: expected a non-empty string"),
    ("[scopes]\n'has space' = 'x'\n", "[scopes] 'has space'"),
    ("[scopes]\nimap = ''\n", "[scopes] imap: expected a non-empty string"),
    ("[server]\nissuer = 'http://auth.example.org'\n", "[server] issuer: plain http is allowed only on loopback"),
    ("[server]\nissuer = 'https://auth.example.org/oauth'\n", "[server] issuer: a path"),
    ("[server\n", "not valid TOML"),
    ("[dovecot]\ndoveadm_url = 'http://mail.example.org:8080/doveadm/v1'\ndoveadm_key_file = 'k'\n",
     "[dovecot] doveadm_url: plain http is allowed only on loopback"),
    ("[dovecot]\ndoveadm_url = 'ftp://127.0.0.1/doveadm/v1'\ndoveadm_key_file = 'k'\n",
     "[dovecot] doveadm_url: expected an http(s) URL"),
    ("[dovecot]\ndoveadm_url = 'https://doveadm:pw@mail.example.org/doveadm/v1'\ndoveadm_key_file = 'k'\n",
     "[dovecot] doveadm_url: no user or password in the URL"),
    ("[dovecot]\ndoveadm_url = 'http://127.0.0.1:8080/doveadm/v1'\n", "[dovecot] doveadm_key_file: needed"),
    ("[dovecot]\ntimeout = 60\n", "[dovecot] timeout: at most 30 seconds"),
    ("[dovecot]\nusername = 'uid'\n", "[dovecot] username: 'uid' is not one of"),
    ("[dovecot]\nusername = 'user@realm'\n", "[sasl] realm: needed by the user@realm form of [dovecot] username"),
    ("[dovecot]\nservices = []\n", "[dovecot] services: name at least one"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_twistd_options_refuse_a_bad_config_or_endpoint_in_one_line(tmp_path):
    """A SystemExit with a message, which Python prints as one line on stderr with status 1: twistd
    would print its whole usage text above a UsageError (tests/test_operator_mistakes.py runs it)."""
    path = tmp_path / "c.toml"
    path.write_text("[tokens]\naccess_ttl = 'soon'\n")
    with pytest.raises(SystemExit, match="^twistd bearerbridge: .*access_ttl"):
        tap.Options().parseOptions(["--config", str(path)])
    path.write_text("[http]\nlisten = ['carrier-pigeon:80']\n")
    with pytest.raises(SystemExit, match=r"\[http\] listen\[0\]"):
        tap.Options().parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit, match="cannot read the config file: No such file"):
        tap.Options().parseOptions(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(usage.UsageError):  # a mistake in the command line itself stays twistd's
        tap.Options().parseOptions(["--confgi", str(path)])


# -- relative paths ---------------------------------------------------------------------------------------

def test_relative_paths_in_a_file_resolve_against_its_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "bearerbridge.toml"
    path.write_text('[server]\nsecret_key_file = "keys/secret.key"\n[http]\naccess_log = "../log/access.log"\n'
                    '[database]\nurl = "sqlite:///data/bb.db"\n')
    monkeypatch.chdir(tmp_path)  # run from elsewhere, and name the file relatively
    loaded = config.load("etc/bearerbridge.toml")
    assert loaded.server.secret_key_file == str(tmp_path / "etc" / "keys" / "secret.key")
    assert loaded.http.access_log == str(tmp_path / "etc" / ".." / "log" / "access.log")
    assert loaded.database.url == f"sqlite:///{tmp_path / 'etc' / 'data' / 'bb.db'}"
    monkeypatch.setenv(config.ENV_VAR, "etc/bearerbridge.toml")  # so does $BEARERBRIDGE_CONFIG's
    assert config.load() == loaded


def test_the_doveadm_key_file_resolves_against_the_config_files_directory(tmp_path):
    path = tmp_path / "bearerbridge.toml"
    path.write_text('[dovecot]\ndoveadm_url = "https://mail.example.org/doveadm/v1"\n'
                    'doveadm_key_file = "doveadm.key"\nusername = "email"\nnarrow_by_address = false\n')
    loaded = config.load(path).dovecot
    assert loaded.doveadm_key_file == str(tmp_path / "doveadm.key")
    assert (loaded.username, loaded.narrow_by_address, loaded.timeout) == ("email", False, 5.0)


def test_the_documented_defaults_resolve_beside_the_example_file():
    loaded = config.load(EXAMPLE)
    assert loaded.server.secret_key_file == str(EXAMPLE.parent.absolute() / "var" / "secret.key")
    assert loaded.database.url == f"sqlite:///{EXAMPLE.parent.absolute() / 'var' / 'bearerbridge.db'}"
    assert loaded.http.access_log == ""  # none stays none
    assert loaded.audit.file == str(EXAMPLE.parent.absolute() / "var" / "audit.log")


def test_without_a_file_the_defaults_stay_relative_to_the_working_directory(monkeypatch):
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    loaded = config.load()
    assert loaded.server.secret_key_file == "var/secret.key"
    assert loaded.database.url == "sqlite:///var/bearerbridge.db"


@pytest.mark.parametrize("url, resolved", [
    ("sqlite:////srv/bb.db", "sqlite:////srv/bb.db"),                          # absolute: as it is
    ("sqlite:///bb.db?timeout=3", "sqlite:///{base}/bb.db?timeout=3"),         # the query kept
    ("sqlite+pysqlite:///bb.db", "sqlite+pysqlite:///{base}/bb.db"),           # a driver named
    ("sqlite://", "sqlite://"),                                                # memory
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("sqlite:///file:bb.db?uri=true", "sqlite:///file:bb.db?uri=true"),        # SQLite's URI form
    ("postgresql+psycopg://bb@db.internal/bb", "postgresql+psycopg://bb@db.internal/bb"),
])
def test_which_database_urls_are_paths(tmp_path, url, resolved):
    settings = config.Config(database=config.DatabaseSettings(url=url))
    assert config.resolve_paths(settings, tmp_path).database.url == resolved.format(base=tmp_path)


def test_absolute_paths_and_endpoint_strings_are_left_alone(tmp_path):
    settings = config.Config(server=config.ServerSettings(secret_key_file="/etc/bb/secret.key"),
                             http=config.HttpSettings(listen=("ssl:8443:privateKey=key.pem:certKey=cert.pem",
                                                              "unix:run/http.sock")))
    resolved = config.resolve_paths(settings, tmp_path)
    assert resolved.server.secret_key_file == "/etc/bb/secret.key"
    assert resolved.http.listen == settings.http.listen  # Twisted's: relative to the working directory


@pytest.mark.parametrize("url", ["mysql://bb@127.0.0.1/bb", "mysql+pymysql://bb@h/bb", "oracle://h/x", "bb.db"])
def test_databases_other_than_sqlite_and_postgresql_are_refused(url):
    with pytest.raises(config.ConfigError, match=r"^\[database\] url: a .* is not supported"):
        config.parse({"database": {"url": url}})


def test_a_key_that_cannot_be_created_names_the_key_and_the_file(tmp_path):
    (tmp_path / "keys").write_text("a file, not a directory\n")
    where = tmp_path / "keys" / "secret.key"
    settings = config.Config(server=config.ServerSettings(secret_key_file=str(where)))
    with pytest.raises(config.ConfigError, match=rf"^\[server\] secret_key_file: cannot .* {where}: Not a directory"):
        config.secret_key(settings)


def test_secret_key_is_created_once_and_private(tmp_path):
    settings = config.Config(server=config.ServerSettings(secret_key_file=str(tmp_path / "k" / "secret.key")))
    key = config.secret_key(settings)
    assert len(key) == 32 and config.secret_key(settings) == key
    assert os.stat(tmp_path / "k" / "secret.key").st_mode & 0o777 == 0o600


def test_plain_for_a_service_adds_plain_to_the_offered_mechanisms():
    assert SaslSettings().offered == ("OAUTHBEARER", "XOAUTH2")
    assert SaslSettings(mechanisms=("OAUTHBEARER",), plain=("imap",)).offered == ("OAUTHBEARER", "PLAIN")
    assert SaslSettings(mechanisms=("PLAIN", "XOAUTH2"), plain=("imap",)).offered == ("PLAIN", "XOAUTH2")


def test_the_audit_file_is_relative_to_the_config_file_and_may_be_empty(tmp_path):
    path = tmp_path / "bearerbridge.toml"
    path.write_text('[audit]\nfile = "logs/audit.log"\n')
    assert config.load(path).audit.file == str(tmp_path / "logs" / "audit.log")
    path.write_text('[audit]\nfile = ""\n')
    assert config.load(path).audit.file == ""
    path.write_text('[audit]\nfile = 3\n')
    with pytest.raises(config.ConfigError, match=r"\[audit\] file: expected a non-empty string"):
        config.load(path)
    assert config.Config().audit.file == "var/audit.log"

"""Reading the TOML config: defaults, the documented example, and refusals that name the key."""

from __future__ import annotations

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
    for section in ("server", "http", "database", "tokens", "sasl", "forward_auth"):
        documented = set(data[section])
        known = set(getattr(config.Config(), section).__dataclass_fields__)
        assert documented == known, f"[{section}] in conf/bearerbridge.toml"
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
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_twistd_options_refuse_a_bad_config_or_endpoint(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[tokens]\naccess_ttl = 'soon'\n")
    with pytest.raises(usage.UsageError, match="access_ttl"):
        tap.Options().parseOptions(["--config", str(path)])
    path.write_text("[http]\nlisten = ['carrier-pigeon:80']\n")
    with pytest.raises(usage.UsageError, match=r"\[http\] listen\[0\]"):
        tap.Options().parseOptions(["--config", str(path)])
    with pytest.raises(usage.UsageError, match="No such file"):
        tap.Options().parseOptions(["--config", str(tmp_path / "missing.toml")])


def test_secret_key_is_created_once_and_private(tmp_path):
    settings = config.Config(server=config.ServerSettings(secret_key_file=str(tmp_path / "k" / "secret.key")))
    key = config.secret_key(settings)
    assert len(key) == 32 and config.secret_key(settings) == key
    assert os.stat(tmp_path / "k" / "secret.key").st_mode & 0o777 == 0o600


def test_plain_for_a_service_adds_plain_to_the_offered_mechanisms():
    assert SaslSettings().offered == ("OAUTHBEARER", "XOAUTH2")
    assert SaslSettings(mechanisms=("OAUTHBEARER",), plain=("imap",)).offered == ("OAUTHBEARER", "PLAIN")
    assert SaslSettings(mechanisms=("PLAIN", "XOAUTH2"), plain=("imap",)).offered == ("PLAIN", "XOAUTH2")

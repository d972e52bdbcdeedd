"""What the test modules running real peers (tests/peers.py) set up alike, so that each fixture
keeps only what is particular to it: the peers required and root, a directory for each program,
every peer started stopped at the end, each log's share of a test printed for pytest to show when
the test fails, a Dovecot introspecting at bearerbridge, and the doveadm HTTP API as
conf/dovecot/doveadm-http.conf sets it up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .peers import CONF, Dovecot, PeerError, Postfix, log_since, log_size, start_dovecot
from .support import Service, free_port, missing, require_peer, wait_for

DOVEADM_SNIPPET = CONF / "dovecot" / "doveadm-http.conf"


def require_peers_as_root(*programs: str) -> None:
    """Each of `programs` installed, and root to run the peers (as CI does); else skip, or fail
    under CI=true."""
    for program in programs:
        require_peer(program)
    if os.geteuid() != 0:
        missing("the peers run as root (as CI does)")


def peer_directories(top: Path, *names: str) -> dict[str, Path]:
    """A new directory under `top` for each program of `names` (bearerbridge's and each peer's)."""
    directories = {name: top / name for name in names}
    for directory in directories.values():
        directory.mkdir()
    return directories


class Stoppable(Protocol):
    def stop(self) -> None: ...


PeerT = TypeVar("PeerT", bound=Stoppable)


class StartedPeers(contextlib.ExitStack):
    """`started(peer)` returns `peer` and stops it as the block exits: the last started first, and
    each one even if stopping another failed."""

    def __call__(self, peer: PeerT) -> PeerT:
        self.callback(peer.stop)
        return peer


@contextlib.contextmanager
def logs_printed(logs: Mapping[str, Path]) -> Iterator[None]:
    """Print what each of `logs` (by name) gained within the block; pytest shows a test's output
    only when the test fails."""
    offsets = {name: log_size(path) for name, path in logs.items()}
    try:
        yield
    finally:
        for name, path in logs.items():
            print(f"----- {name} ({path}) during the test -----\n{log_since(path, offsets[name])}")


@dataclass
class MailPeers:
    """One bearerbridge, a Postfix asking it over the Dovecot protocol, and a Dovecot introspecting
    at it."""

    service: Service
    postfix: Postfix
    dovecot: Dovecot

    def logs(self) -> dict[str, Path]:
        return {"bearerbridge": self.service.directory / "twistd.log", "postfix": self.postfix.log_path,
                "dovecot": self.dovecot.log_path}


def new_resource_server(service: Service) -> dict:
    """A confidential client that may introspect `imap` tokens, as Dovecot's oauth2 passdb does."""
    return service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")


def start_dovecot_asking(service: Service, directory: Path, resource_server: dict | None = None,
                         **options: Any) -> Dovecot:
    """`start_dovecot` introspecting at `service` as `resource_server` (by default a new one);
    `options` as `start_dovecot` takes them."""
    resource_server = resource_server or new_resource_server(service)
    return start_dovecot(directory, service.url, resource_server["client_id"], resource_server["client_secret"],
                         **options)


@dataclass
class DoveadmApi:
    """The doveadm HTTP API of a test's Dovecot, for bearerbridge's [dovecot] to ask: a new key in a
    file only root reads, and a free port."""

    key: bytes
    key_file: Path
    port: int

    @classmethod
    def keyed(cls, directory: Path) -> DoveadmApi:
        key = secrets.token_hex(32).encode()
        key_file = directory / "doveadm-api.key"
        key_file.write_bytes(key)  # no newline: Dovecot's `<file` would keep it in the key
        key_file.chmod(0o600)
        return cls(key, key_file, free_port())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/doveadm/v1"

    def bearerbridge_conf(self) -> str:
        """bearerbridge's [dovecot] table, asking this API."""
        return f'[dovecot]\ndoveadm_url = "{self.url}"\ndoveadm_key_file = "{self.key_file}"\n'

    def dovecot_conf(self) -> str:
        """conf/dovecot/doveadm-http.conf with only the key file's path and the port replaced."""
        text = DOVEADM_SNIPPET.read_text()
        replaced = (("</etc/dovecot/doveadm-api.key", f"<{self.key_file}"), ("port = 8081", f"port = {self.port}"))
        for old, new in replaced:
            if text.count(old) != 1:
                raise PeerError(f"{DOVEADM_SNIPPET} no longer has {old!r} once")
            text = text.replace(old, new)
        return text

    def wait_until_listening(self, timeout: float) -> None:
        """Until Dovecot (started with `dovecot_conf()`) accepts connections on the API's port."""
        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), 1):
                return True
        wait_for(listening, timeout=timeout, what="Dovecot's doveadm HTTP listener")

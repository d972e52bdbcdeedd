"""The token helper's per-user state: one JSON profile per login, and the decisions about it.

A profile lives in `$XDG_CONFIG_HOME/bearerbridge-token/<name>.json` (`~/.config/...` when the
variable is unset, empty or relative), mode 0600 in a 0700 directory. It holds a refresh token,
so every read-refresh-write happens under an exclusive `flock` on `<name>.lock` beside it, and
every write is atomic (temp file + `os.replace`): the server rotates refresh tokens and treats the
reuse of an old one as theft (RFC 9700 §4.14.2), so losing a rotated one ends the login.

Stdlib only, no network: `bearerbridge.client.cli` does the talking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

APP = "bearerbridge-token"
REFRESH_MARGIN = 60  # seconds: refresh an access token that expires sooner than this
# Seconds: refresh an access token older than this, so that a login revoked at the server (by the
# user, an operator, or a disabled account) is noticed at the first `print` after this bound
# rather than when the token expires (an hour at bearerbridge). `print --max-age` changes it.
MAX_AGE = 300
LOCK_POLL = 0.05  # seconds between tries for a profile's lock that another process holds
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ProtocolError(Exception):
    """The server's reply broke the protocol; the message never quotes the reply."""


class DamagedProfile(ValueError):
    """The profile file cannot be read as a profile."""


@dataclass(frozen=True)
class Profile:
    """One login: where the server is, who we are to it, and the tokens it gave us."""

    issuer: str
    client_id: str
    token_endpoint: str
    revocation_endpoint: str | None = None
    client_secret: str | None = None
    ca_file: str | None = None
    scope: str = ""
    access_token: str | None = None
    expires_at: float | None = None  # seconds since the epoch; None when the server did not say
    refresh_token: str | None = None
    obtained_at: float | None = None  # when the access token was asked for; None in older profiles

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def without_tokens(self) -> Profile:
        """What remains once the server has refused the refresh token: enough to say how to log in."""
        return dataclasses.replace(self, access_token=None, expires_at=None, refresh_token=None, obtained_at=None)


# -- decisions -------------------------------------------------------------------------------

def needs_refresh(profile: Profile, now: float, margin: float = REFRESH_MARGIN, max_age: float = MAX_AGE) -> bool:
    """Whether `print` must refresh before answering.

    A missing access token, or one expiring within `margin` seconds, needs a refresh. When the
    server gave no lifetime (`expires_in` is only RECOMMENDED, RFC 6749 §5.1) we cannot know, so
    we refresh whenever a refresh token allows it. With a refresh token, so does an access token
    older than `max_age` seconds (or of unknown age, or from a clock that went back): the refresh
    asks the server whether the login still stands, and a revoked one is noticed within `max_age`.
    """
    if profile.access_token is None:
        return True
    if profile.refresh_token is not None:
        if profile.obtained_at is None or not 0 <= now - profile.obtained_at < max_age:
            return True
    if profile.expires_at is None:
        return profile.refresh_token is not None
    return profile.expires_at - now < margin


def apply_token_response(profile: Profile, body: object, requested_at: float, requested_scope: str | None = None
                         ) -> Profile:
    """The profile updated from a successful token response (RFC 6749 §5.1).

    The expiry counts from when the request was sent, so it errs early. A refresh response
    without a new refresh token keeps the old one (§6: the server MAY rotate); one without
    `scope` means the scope requested, or the one held before (§5.1, §6).
    """
    if not isinstance(body, dict):
        raise ProtocolError("the token endpoint's reply is not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ProtocolError("the token endpoint's reply has no access_token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":  # RFC 6750 §4: case-insensitive
        raise ProtocolError("the token endpoint issued a token that is not a Bearer token")
    expires_in = body.get("expires_in")
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, (int, float))):
        raise ProtocolError("the token endpoint's expires_in is not a number")
    refresh_token = body.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
        raise ProtocolError("the token endpoint's refresh_token is not a string")
    scope = body.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise ProtocolError("the token endpoint's scope is not a string")
    return dataclasses.replace(
        profile, access_token=access_token,
        expires_at=None if expires_in is None else requested_at + expires_in, obtained_at=requested_at,
        refresh_token=refresh_token or profile.refresh_token,
        scope=scope if scope is not None else (requested_scope if requested_scope is not None else profile.scope))


# -- files -----------------------------------------------------------------------------------

def config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_CONFIG_HOME/bearerbridge-token`; an unset, empty or relative value means `~/.config`
    (XDG Base Directory Specification)."""
    base = environ.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return Path(base) / APP


def check_profile_name(name: str) -> str:
    """A profile name becomes a file name: letters, digits, `.`, `_`, `-`; no leading dot."""
    if not _PROFILE_NAME.fullmatch(name):
        raise ValueError(f"profile name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return name


@dataclass(frozen=True)
class ProfileFile:
    """The profile `name` under `directory`, with its lock file beside it."""

    directory: Path
    name: str

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.name}.lock"

    def ensure_directory(self) -> None:
        """Create the directory 0700 (parents as the umask says), and tighten it if it is looser."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o077:
            self.directory.chmod(0o700)

    @contextlib.asynccontextmanager
    async def locked(self, pause: Callable[[float], Awaitable[object]]) -> AsyncIterator[None]:
        """Hold an exclusive `flock` on the lock file: one read-refresh-write at a time per profile.

        While another process holds it, try again every LOCK_POLL seconds after `pause` (the
        caller's sleep): a blocking flock would stop the caller's event loop, Ctrl-C included."""
        self.ensure_directory()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await pause(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> Profile | None:
        """The stored profile, or None when there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return Profile.from_json(text)
        except (ValueError, TypeError) as error:
            raise DamagedProfile(f"{self.path} is damaged ({type(error).__name__}); log in again") from None

    def save(self, profile: Profile) -> None:
        """Write atomically: a 0600 temp file in the same directory, fsync, `os.replace`."""
        self.ensure_directory()
        fd, temp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(profile.to_json())
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

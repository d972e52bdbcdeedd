"""Signing keys (JOSE): generated here, sealed at rest, published as a JWKS, rotated on a schedule.

Each algorithm (ES256 by default; RS256 for clients that ask for it) has at most one key of
each stage at a time:

- `next`: published in the JWKS but not yet signing, so that a relying party that cached the
  JWKS already knows the key that will sign after the next rotation;
- `current`: signs;
- `retired`: no longer signs, still published until every token it signed has expired.

A rotation (`bearerbridge keys rotate`, or every `[keys] rotate_every` seconds) retires the
current key, makes the next one current and generates a new next one. Keys live in the
database (`storage`), sealed with a key derived from the server's secret (JWE, `dir` +
A256GCM), so every instance sharing the database signs with the same key and a copy of the
database alone reveals none. No JOSE here is written by hand: joserfc does it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from joserfc import jwe
from joserfc.jwk import ECKey, OctKey, RSAKey

ALGORITHMS = ("ES256", "RS256")
# Seconds a running service keeps the keys it read: how late it notices a rotation made by
# another process (`bearerbridge keys rotate`, another instance's timer). Every next key is
# published a whole rotation before it signs, so no relying party meets an unknown kid.
REREAD = 60
DEFAULT_ALGORITHM = "ES256"
_SEALING = {"alg": "dir", "enc": "A256GCM"}


class Stage(StrEnum):
    NEXT = "next"
    CURRENT = "current"
    RETIRED = "retired"


@dataclass(frozen=True)
class SigningKey:
    """One key as stored, its private JWK sealed; `expires_at` is when a retired key leaves the JWKS."""

    kid: str
    alg: str
    stage: Stage
    sealed: str
    since: int  # when it entered its stage
    expires_at: int | None = None


def generate(alg: str) -> ECKey | RSAKey:
    """A new private key for `alg`."""
    if alg == "ES256":
        return ECKey.generate_key("P-256")
    if alg == "RS256":
        return RSAKey.generate_key(2048)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


class KeySealer:
    """Seals and opens private JWKs with a 256-bit key derived from the server's secret."""

    def __init__(self, sealing_key: bytes) -> None:
        self._key = OctKey.import_key(sealing_key)

    def seal(self, private: ECKey | RSAKey) -> str:
        return jwe.encrypt_compact(_SEALING, json.dumps(private.as_dict(private=True)).encode(), self._key)

    def seal_bytes(self, data: bytes, purpose: str) -> str:
        """Seal other secrets (a user's TOTP secret) the same way, for one `purpose`: it stands in
        the JWE's protected header (`cty`), which A256GCM authenticates, so that a value sealed
        for one purpose never opens as another's."""
        return jwe.encrypt_compact({**_SEALING, "cty": purpose}, data, self._key)

    def open_bytes(self, sealed: str, purpose: str) -> bytes:
        """What `seal_bytes` sealed for `purpose`; ValueError for anything else."""
        opened = jwe.decrypt_compact(sealed, self._key)
        if opened.protected.get("cty") != purpose or opened.plaintext is None:
            raise ValueError(f"not a value sealed for {purpose}")
        return opened.plaintext

    def open(self, key: SigningKey) -> ECKey | RSAKey:
        plaintext = jwe.decrypt_compact(key.sealed, self._key).plaintext
        assert plaintext is not None  # a compact JWE always has one
        data = {**json.loads(plaintext), "kid": key.kid}  # so that a KeySet of opened keys finds it by kid
        return ECKey.import_key(data) if data["kty"] == "EC" else RSAKey.import_key(data)

    def new(self, alg: str, stage: Stage, now: int) -> SigningKey:
        """A freshly generated key; its kid is its RFC 7638 thumbprint, the same wherever it is read."""
        private = generate(alg)
        return SigningKey(private.thumbprint(), alg, stage, self.seal(private), now)


def published(keys: Iterable[SigningKey], now: int) -> list[SigningKey]:
    """The keys a JWKS shows at `now`: next, current, and retired ones not yet expired."""
    return [k for k in keys if k.stage is not Stage.RETIRED or (k.expires_at or 0) > now]


def jwks(keys: Iterable[SigningKey], sealer: KeySealer, now: int) -> dict[str, Any]:
    """The public JWKS (RFC 7517 §5) of the published keys, each with kid, alg and use."""
    return {"keys": [{**sealer.open(k).as_dict(private=False), "kid": k.kid, "alg": k.alg, "use": "sig"}
                     for k in sorted(published(keys, now), key=lambda k: (k.alg, list(Stage).index(k.stage)))]}


def dovecot_entries(keys: Iterable[SigningKey], sealer: KeySealer, now: int) -> dict[str, str]:
    """The published keys as Dovecot's oauth2 `local_validation_key_dict` wants them: under
    `default/<ALG>/<kid>` (a JWT access token has no azp, so Dovecot looks in `default`), the
    public key as PEM. Kids are thumbprints (base64url): nothing in them needs escaping."""
    return {f"default/{k.alg}/{k.kid}": sealer.open(k).as_pem(private=False).decode()
            for k in published(keys, now)}


def current(keys: Sequence[SigningKey], alg: str) -> SigningKey | None:
    """The key that signs for `alg`."""
    return next((k for k in keys if k.alg == alg and k.stage is Stage.CURRENT), None)


@dataclass(frozen=True)
class Rotation:
    """What a rotation changes: keys to store anew, and keys that enter another stage."""

    added: tuple[SigningKey, ...]
    changed: tuple[SigningKey, ...]


def missing(keys: Sequence[SigningKey], sealer: KeySealer, now: int) -> list[SigningKey]:
    """The keys to make so that every algorithm has a current and a next key (on first start)."""
    made = []
    for alg in ALGORITHMS:
        for stage in (Stage.CURRENT, Stage.NEXT):
            if not any(k.alg == alg and k.stage is stage for k in keys):
                made.append(sealer.new(alg, stage, now))
    return made


def rotation(keys: Sequence[SigningKey], sealer: KeySealer, now: int, lifetime: int) -> Rotation:
    """Retire each current key (published `lifetime` seconds more: the longest a token it signed
    lives), make each next key current, and make a new next one."""
    changed: list[SigningKey] = []
    added: list[SigningKey] = []
    for alg in ALGORITHMS:
        old, upcoming = current(keys, alg), next((k for k in keys if k.alg == alg and k.stage is Stage.NEXT), None)
        if old is not None:
            changed.append(dataclasses.replace(old, stage=Stage.RETIRED, since=now, expires_at=now + lifetime))
        if upcoming is not None:
            changed.append(dataclasses.replace(upcoming, stage=Stage.CURRENT, since=now))
        else:
            added.append(sealer.new(alg, Stage.CURRENT, now))
        added.append(sealer.new(alg, Stage.NEXT, now))
    return Rotation(tuple(added), tuple(changed))


def due(keys: Sequence[SigningKey], now: int, every: int) -> bool:
    """Whether the current keys are older than `every` seconds."""
    signing = [k for k in keys if k.stage is Stage.CURRENT]
    return bool(signing) and min(k.since for k in signing) + every <= now

"""Two-factor sign-in at rest: a user's TOTP secret (`totp_secrets`, sealed with a key derived
from the server's secret: a copy of the database alone shows none) and their single-use recovery
codes (`recovery_codes`, keyed digests). Functions of a Connection, called through `SqlStore`.

A code is accepted once: `last_step` holds the time step of the last code accepted, and only a
later step passes, in one conditional UPDATE, so two instances (or two tabs) sent the same code
at once let exactly one of them in. A recovery code is spent the same way (`used_at`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bearerbridge import otp
from bearerbridge.keys import KeySealer
from bearerbridge.storage.schema import recovery_codes, totp_secrets

SEALED_FOR = "totp secret"  # the purpose a secret is sealed for (`KeySealer.seal_bytes`)


class CodeCheck(StrEnum):
    """How a code typed at the second step came out; the failures are audit reasons."""

    TOTP = "totp"
    RECOVERY = "recovery"
    WRONG = "wrong_code"
    REUSED = "reused_code"


@dataclass(frozen=True)
class TwoFactor:
    """A user's two-factor sign-in, as their page shows it."""

    enabled_at: int | None  # when a first code confirmed the secret; None: off
    waiting: bool  # a secret made, waiting for its first code
    recovery_left: int


def state(db: Connection, user_id: int) -> TwoFactor:
    row = db.execute(sa.select(totp_secrets.c.confirmed_at).where(totp_secrets.c.user_id == user_id)).first()
    left = db.execute(sa.select(sa.func.count()).select_from(recovery_codes).where(
        recovery_codes.c.user_id == user_id, recovery_codes.c.used_at.is_(None))).scalar_one()
    confirmed = row.confirmed_at if row is not None else None
    return TwoFactor(confirmed, row is not None and confirmed is None, left)


def enabled(db: Connection, user_id: int) -> bool:
    """Whether signing in as the user asks for a second factor."""
    return db.execute(sa.select(totp_secrets.c.user_id).where(
        totp_secrets.c.user_id == user_id, totp_secrets.c.confirmed_at.is_not(None))).first() is not None


def begin(db: Connection, sealer: KeySealer, user_id: int, secret: str) -> bool:
    """Keep a new secret waiting for its first code, in place of one already waiting; False (and
    nothing changed) when two-factor sign-in is on: it must be turned off first."""
    if enabled(db, user_id):
        return False
    db.execute(totp_secrets.delete().where(totp_secrets.c.user_id == user_id))
    db.execute(totp_secrets.insert().values(user_id=user_id, sealed=sealer.seal_bytes(secret.encode(), SEALED_FOR),
                                            confirmed_at=None, last_step=None))
    return True


def _secret(db: Connection, sealer: KeySealer, user_id: int, confirmed: bool) -> tuple[str, int | None] | None:
    """The user's secret, opened, and its last step; of the confirmed one or of the waiting one."""
    condition = totp_secrets.c.confirmed_at.is_not(None) if confirmed else totp_secrets.c.confirmed_at.is_(None)
    row = db.execute(sa.select(totp_secrets.c.sealed, totp_secrets.c.last_step).where(
        totp_secrets.c.user_id == user_id, condition)).first()
    return None if row is None else (sealer.open_bytes(row.sealed, SEALED_FOR).decode(), row.last_step)


def waiting_secret(db: Connection, sealer: KeySealer, user_id: int) -> str | None:
    """The secret waiting for its first code, to show again (its QR code and text)."""
    found = _secret(db, sealer, user_id, confirmed=False)
    return found[0] if found else None


def _spend_step(db: Connection, user_id: int, steps: Sequence[int], last: int | None,
                extra: dict[str, int] | None = None) -> CodeCheck:
    """Accept the earliest of `steps` later than the last step accepted, if still so when written."""
    later = [s for s in steps if last is None or s > last]
    if not steps:
        return CodeCheck.WRONG
    if not later:
        return CodeCheck.REUSED
    spent = db.execute(totp_secrets.update().where(
        totp_secrets.c.user_id == user_id,
        sa.or_(totp_secrets.c.last_step.is_(None), totp_secrets.c.last_step < later[0]))
        .values(last_step=later[0], **(extra or {}))).rowcount
    return CodeCheck.TOTP if spent == 1 else CodeCheck.REUSED


def confirm(db: Connection, sealer: KeySealer, user_id: int, typed: str, now: float) -> bool:
    """Turn two-factor sign-in on, if `typed` is the current code of the waiting secret (which
    proves the user's app holds it). The code counts as used: it cannot sign in after."""
    found = _secret(db, sealer, user_id, confirmed=False)
    if found is None:
        return False
    secret, last = found
    return _spend_step(db, user_id, otp.matching_steps(secret, typed, now), last,
                       {"confirmed_at": int(now)}) is CodeCheck.TOTP


def use_code(db: Connection, sealer: KeySealer, user_id: int, typed: str, now: float) -> CodeCheck:
    """Check a code from the user's app, and spend its step."""
    found = _secret(db, sealer, user_id, confirmed=True)
    if found is None:
        return CodeCheck.WRONG
    secret, last = found
    return _spend_step(db, user_id, otp.matching_steps(secret, typed, now), last)


def replace_recovery_codes(db: Connection, digest: Callable[[str], str], user_id: int, codes: Sequence[str]) -> None:
    """Keep the digests of `codes` as the user's recovery codes; the old ones stop working."""
    db.execute(recovery_codes.delete().where(recovery_codes.c.user_id == user_id))
    keys = [otp.recovery_key(code) for code in codes]
    db.execute(recovery_codes.insert(), [{"code_digest": digest(key), "user_id": user_id, "used_at": None}
                                         for key in keys if key is not None])


def use_recovery_code(db: Connection, digest: Callable[[str], str], user_id: int, typed: str,
                      now: float) -> CodeCheck:
    """Spend one of the user's recovery codes: RECOVERY the first time, REUSED after, WRONG for a
    code that is not theirs. Only a user with two-factor sign-in on has codes to spend."""
    key = otp.recovery_key(typed)
    if key is None or not enabled(db, user_id):
        return CodeCheck.WRONG
    code = recovery_codes.c.code_digest == digest(key)
    mine = sa.and_(code, recovery_codes.c.user_id == user_id)
    spent = db.execute(recovery_codes.update().where(mine, recovery_codes.c.used_at.is_(None))
                       .values(used_at=int(now))).rowcount
    if spent == 1:
        return CodeCheck.RECOVERY
    return CodeCheck.REUSED if db.execute(sa.select(recovery_codes.c.user_id).where(mine)).first() else CodeCheck.WRONG


def disable(db: Connection, user_id: int) -> bool:
    """Turn two-factor sign-in off: forget the secret and the recovery codes; False if it was off."""
    db.execute(recovery_codes.delete().where(recovery_codes.c.user_id == user_id))
    return db.execute(totp_secrets.delete().where(totp_secrets.c.user_id == user_id,
                                                  totp_secrets.c.confirmed_at.is_not(None))).rowcount > 0

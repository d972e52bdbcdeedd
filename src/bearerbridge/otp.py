"""Two-factor sign-in's codes, without I/O: TOTP (RFC 6238, with pyotp), the QR code an
authenticator app scans (segno, as inline SVG), and single-use recovery codes.

A TOTP code is accepted for the step it belongs to and the one before and after (a clock a step
off either way, RFC 6238 §5.2), and only for a step later than the last one accepted
(`storage.twofactor`), so that a code seen over someone's shoulder cannot be used again.
Recovery codes are 50 random bits each, shown once and kept as keyed digests; a fast keyed
hash protects them at rest as it does tokens (`crypto`), and guessing one is throttled.
"""

from __future__ import annotations

import hmac
import re
import secrets

import pyotp
import segno

STEP = 30  # seconds: what every authenticator app uses (RFC 6238 §5.2's recommendation)
DIGITS = 6
WINDOW = 1  # steps accepted either side of now
RECOVERY_CODES = 10
# Recovery codes: letters and digits that cannot be mistaken for one another when read off paper.
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_RECOVERY_LENGTH = 10  # 31 ** 10: 49.5 bits
_TYPED_CODE = re.compile(rf"[0-9]{{{DIGITS}}}")


def new_secret() -> str:
    """A TOTP secret: 160 random bits in base32 (RFC 4226 §4's recommended length)."""
    return pyotp.random_base32()


def grouped(secret: str) -> str:
    """The secret as a person types it into an app: groups of four."""
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The `otpauth://totp/...` URI the QR code holds (Google Authenticator's Key Uri Format,
    which every authenticator app reads): the issuer names the site, the account the user."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(name=account, issuer_name=issuer)


def qr_svg(uri: str) -> str:
    """The QR code of `uri` as an inline `<svg>` element: drawn by the server, so the page needs no
    script and no image source beyond its own (`default-src 'self'`). It scales to its box (CSS)."""
    qr = segno.make(uri, error="m", micro=False)
    return qr.svg_inline(scale=1, border=4, omitsize=True, dark="#000", light="#fff", svgclass="qr",
                         lineclass=None, title="QR code to scan with your authenticator app")


def typed_code(typed: str) -> str | None:
    """A TOTP code as typed (spaces allowed: apps show `123 456`), if it has the form of one."""
    code = "".join(typed.split())
    return code if _TYPED_CODE.fullmatch(code) else None


def matching_steps(secret: str, typed: str, now: float) -> list[int]:
    """The time steps, within WINDOW of `now`, whose code is `typed`, earliest first (most often
    one; none for a wrong code). Each comparison takes the same time whatever the code."""
    code = typed_code(typed)
    if code is None:
        return []
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    step = int(now) // STEP
    return [s for s in range(step - WINDOW, step + WINDOW + 1)
            if hmac.compare_digest(totp.at(s * STEP), code)]


def code_at(secret: str, now: float) -> str:
    """The code an authenticator app shows at `now` (for tests and the command line)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).at(int(now))


def new_recovery_codes() -> list[str]:
    """RECOVERY_CODES fresh codes, as shown: `abcde-fghjk`."""
    return [_shown("".join(secrets.choice(_ALPHABET) for _ in range(_RECOVERY_LENGTH)))
            for _ in range(RECOVERY_CODES)]


def _shown(code: str) -> str:
    half = _RECOVERY_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def recovery_key(typed: str) -> str | None:
    """A recovery code as typed, in the one form its digest is taken of (lower case, without the
    dash or spaces); None when it cannot be one."""
    code = re.sub(r"[\s-]", "", typed).lower()
    return code if len(code) == _RECOVERY_LENGTH and all(c in _ALPHABET for c in code) else None

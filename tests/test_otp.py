"""otp.py without I/O: RFC 6238's test vector, the window of one step either side, codes as
people type them, recovery codes, the QR code's SVG; and keys.KeySealer sealing a TOTP secret
for its purpose alone."""

from __future__ import annotations

import base64

import pytest

from bearerbridge import otp
from bearerbridge.keys import KeySealer

# RFC 6238 Appendix B: the SHA-1 seed "12345678901234567890"; at T = 59 s the 8-digit TOTP is
# 94287082, so the 6-digit one (its last six digits, RFC 4226 §5.3) is 287082.
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()


def test_the_rfc_6238_vector():
    assert otp.code_at(RFC_SECRET, 59) == "287082"
    assert otp.matching_steps(RFC_SECRET, "287082", 59) == [1]


def test_a_code_is_accepted_one_step_either_side_and_no_further():
    secret = otp.new_secret()
    now = 1_800_000_015.0  # the middle of step 60,000,000
    step = int(now) // otp.STEP
    for offset in (-1, 0, 1):
        assert otp.matching_steps(secret, otp.code_at(secret, now + offset * otp.STEP), now) == [step + offset]
    for offset in (-2, 2):
        code = otp.code_at(secret, now + offset * otp.STEP)
        assert step + offset not in otp.matching_steps(secret, code, now)


def test_codes_as_typed():
    assert otp.typed_code(" 123 456 ") == "123456"
    for typed in ("12345", "1234567", "12345a", "", "１２３４５６"):  # the last: full-width digits
        assert otp.typed_code(typed) is None
        assert otp.matching_steps(otp.new_secret(), typed, 0) == []


def test_recovery_codes_are_ten_different_and_read_back_however_typed():
    codes = otp.new_recovery_codes()
    assert len(set(codes)) == otp.RECOVERY_CODES == 10
    code = codes[0]
    assert len(code) == 11 and code[5] == "-"
    assert otp.recovery_key(code) == otp.recovery_key(code.upper().replace("-", " ")) == code.replace("-", "")
    assert otp.recovery_key("0oO1l-Iabcd") is None  # characters the codes never hold
    assert otp.recovery_key("abc") is None


def test_the_qr_code_is_plain_svg_the_page_may_inline():
    svg = otp.qr_svg(otp.provisioning_uri(otp.new_secret(), "alice", "Example Mail"))
    assert svg.startswith('<svg viewBox="0 0 ') and svg.endswith("</svg>")
    assert "style=" not in svg and "<script" not in svg and "href" not in svg  # nothing a CSP would refuse
    assert otp.grouped("ABCDEFGHIJ") == "ABCD EFGH IJ"


def test_a_totp_secret_is_sealed_for_its_purpose_alone():
    sealer = KeySealer(b"k" * 32)
    sealed = sealer.seal_bytes(b"JBSWY3DPEHPK3PXP", "totp secret")
    assert b"JBSWY3DPEHPK3PXP" not in sealed.encode()
    assert sealer.open_bytes(sealed, "totp secret") == b"JBSWY3DPEHPK3PXP"
    with pytest.raises(ValueError):
        sealer.open_bytes(sealed, "something else")
    with pytest.raises(Exception):  # noqa: B017 (joserfc's own error for a key it was not sealed with)
        KeySealer(b"o" * 32).open_bytes(sealed, "totp secret")

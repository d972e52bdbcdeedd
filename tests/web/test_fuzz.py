"""Property tests (hypothesis) of parse_query, the one parser of every query string and form body.

Whatever arrives, it answers with the fields or BadRequest, never another exception; what
urllib.parse.urlencode made of a dict comes back as that dict; and it is lossless: a value it
returns is exactly what the client percent-encoded, never a replacement character in place of
bytes that were not UTF-8. Derandomized when CI=true; bench/fuzz.py runs these with a million inputs.
"""

from __future__ import annotations

import os
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bearerbridge.web.site import MAX_FIELDS, BadRequest, parse_query

# bench/fuzz.py sets this before importing the module, for its long run.
_LONG_RUN = int(os.environ.get("BEARERBRIDGE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """As in tests/sasl/test_fuzz.py: few examples in the suite, the same ones on every CI run."""
    return settings(max_examples=_LONG_RUN or examples, deadline=None, database=None,
                    derandomize=os.environ.get("CI") == "true", suppress_health_check=[HealthCheck.too_slow])


# What query strings are made of, weighted towards the characters that mean something.
query_bytes = st.lists(st.one_of(st.sampled_from([b"&", b"=", b"%", b"+", b";", b"%2", b"%FF", b"%C3", b"%A9", b"%00",
                                                  b"%26", b"%3D", b"a", b"\xc3\xa9", b"\xff", b"\x00"]),
                                 st.binary(max_size=3)), max_size=40).map(b"".join)


def _parsed_or_refused(raw):
    try:
        fields = parse_query(raw)
    except BadRequest:
        return None
    assert isinstance(fields, dict)
    assert all(isinstance(k, str) and v and all(isinstance(x, str) for x in v) for k, v in fields.items())
    assert sum(map(len, fields.values())) <= MAX_FIELDS
    return fields


@fuzz(400)
@given(raw=st.one_of(query_bytes, st.binary(max_size=100)))
def test_any_bytes_give_fields_or_bad_request(raw):
    fields = _parsed_or_refused(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        assert fields is None
    else:
        assert _parsed_or_refused(text) == fields  # bytes and their text are read alike


@fuzz(300)
@given(text=st.text(st.characters(blacklist_categories=()), max_size=60))
def test_any_text_gives_fields_or_bad_request(text):
    _parsed_or_refused(text)


form_dicts = st.dictionaries(st.text(max_size=12), st.lists(st.text(max_size=12), min_size=1, max_size=3), max_size=8)


@fuzz(300)
@given(fields=form_dicts, as_bytes=st.booleans())
def test_what_urlencode_made_comes_back(fields, as_bytes):
    encoded = urlencode(fields, doseq=True)
    raw = encoded.encode("ascii") if as_bytes else encoded
    if sum(map(len, fields.values())) > MAX_FIELDS:
        assert _parsed_or_refused(raw) is None
    else:
        assert parse_query(raw) == {key: values for key, values in fields.items()}


@fuzz(300)
@given(key=st.text(min_size=1, max_size=8), value=st.binary(max_size=12))
def test_a_value_comes_back_exactly_as_encoded_or_is_refused(key, value):
    """Percent-encoded bytes that are not UTF-8 are refused, never read as U+FFFD (the docstring's
    "strict UTF-8"): two different secrets or states must not come out as the same string."""
    fields = _parsed_or_refused(f"{quote(key)}={quote(value)}")
    try:
        expected = {key: [value.decode("utf-8")]}
    except UnicodeDecodeError:
        assert fields is None
    else:
        assert fields == expected

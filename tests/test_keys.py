"""keys.py: signing keys made, sealed, published and rotated (joserfc does the JOSE)."""

from __future__ import annotations

import base64
import json

import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bearerbridge import keys
from bearerbridge.keys import KeySealer, Stage

SEALER = KeySealer(b"s" * 32)


def first_keys(now: int = 1000) -> list[keys.SigningKey]:
    return keys.missing([], SEALER, now)


def after(found: list[keys.SigningKey], rotation: keys.Rotation) -> list[keys.SigningKey]:
    changed = {k.kid: k for k in rotation.changed}
    return [changed.get(k.kid, k) for k in found] + list(rotation.added)


def test_first_start_makes_a_current_and_a_next_key_for_each_algorithm():
    made = first_keys()
    assert sorted((k.alg, k.stage) for k in made) == [
        ("ES256", Stage.CURRENT), ("ES256", Stage.NEXT), ("RS256", Stage.CURRENT), ("RS256", Stage.NEXT)]
    assert keys.missing(made, SEALER, 1000) == []
    assert len({k.kid for k in made}) == 4


def test_the_jwks_holds_public_halves_only_with_kid_alg_and_use():
    document = keys.jwks(first_keys(), SEALER, 1000)
    assert len(document["keys"]) == 4
    for jwk in document["keys"]:
        assert "d" not in jwk and "p" not in jwk and jwk["use"] == "sig" and jwk["alg"] in keys.ALGORITHMS
    KeySet.import_key_set(document)  # a JWKS a library reads


def test_a_sealed_key_opens_only_with_the_server_secret_and_its_kid_is_its_thumbprint():
    key = first_keys()[0]
    assert '"d"' not in key.sealed and SEALER.open(key).thumbprint() == key.kid
    with pytest.raises(JoseError):
        KeySealer(b"t" * 32).open(key)


def test_a_rotation_signs_with_the_published_next_key_and_keeps_the_old_one_until_its_tokens_expire():
    found = first_keys(now=1000)
    old, upcoming = keys.current(found, "ES256"), next(k for k in found if k.alg == "ES256" and k.stage == "next")
    token = jwt.encode({"alg": "ES256", "kid": old.kid}, {"sub": "x"}, SEALER.open(old))
    cached = KeySet.import_key_set(keys.jwks(found, SEALER, 1000))  # a relying party's cache, before
    rotated = after(found, keys.rotation(found, SEALER, now=5000, lifetime=3600))
    assert keys.current(rotated, "ES256").kid == upcoming.kid  # already in the cached JWKS
    assert {k.kid for k in keys.published(rotated, 5000)} >= {old.kid, upcoming.kid}
    jwt.decode(token, KeySet.import_key_set(keys.jwks(rotated, SEALER, 5000)))  # the old token still verifies
    new_token = jwt.encode({"alg": "ES256", "kid": upcoming.kid}, {"sub": "y"}, SEALER.open(upcoming))
    jwt.decode(new_token, cached)  # and a token of the new key verifies with the JWKS cached before
    assert old.kid not in {k.kid for k in keys.published(rotated, 5000 + 3600)}  # gone once its tokens are


def test_rotation_is_due_after_rotate_every_since_the_current_keys_began_to_sign():
    found = first_keys(now=1000)
    assert not keys.due(found, 1000 + 99, every=100) and keys.due(found, 1000 + 100, every=100)
    rotated = after(found, keys.rotation(found, SEALER, now=2000, lifetime=60))
    assert not keys.due(rotated, 2050, every=100)  # the promoted key counts from its promotion


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError):
        keys.generate("HS256")


def test_the_sealed_form_is_a_compact_jwe_with_dir_and_a256gcm():
    header = json.loads(base64.urlsafe_b64decode(first_keys()[0].sealed.split(".")[0] + "=="))
    assert header == {"alg": "dir", "enc": "A256GCM"}

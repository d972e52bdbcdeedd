"""/jwks in process: the published keys, remembered for keys.REREAD seconds, a rotation seen after."""

from __future__ import annotations

import json

from joserfc.jwk import KeySet

from bearerbridge import keys

from ..fakes import Bridge, sqlite_store


def jwks(bridge: Bridge) -> dict:
    answer = bridge.browser().get("/jwks")
    assert answer.code == 200 and answer.header("Content-Type") == "application/jwk-set+json"
    assert answer.header("Access-Control-Allow-Origin") == "*"
    assert answer.header("Cache-Control") == f"public, max-age={keys.REREAD}"
    return json.loads(answer.body)


def test_the_jwks_is_made_on_first_use_remembered_and_shows_a_rotation_within_reread(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    bridge = Bridge.over(store)
    first = jwks(bridge)
    KeySet.import_key_set(first)
    assert sorted(k["alg"] for k in first["keys"]) == ["ES256", "ES256", "RS256", "RS256"]
    assert all("d" not in k for k in first["keys"])
    with store.transaction():
        store.rotate_signing_keys(3600)
    assert jwks(bridge) == first  # remembered
    bridge.clock.advance(keys.REREAD)
    rotated = jwks(bridge)
    assert len(rotated["keys"]) == 6  # the retired pair stays while its tokens may live
    assert {k["kid"] for k in first["keys"]} < {k["kid"] for k in rotated["keys"]}
    store.engine.dispose()


def test_the_metadata_names_the_jwks(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    document = json.loads(Bridge.over(store).browser().get("/.well-known/oauth-authorization-server").body)
    assert document["jwks_uri"] == "http://127.0.0.1:8080/jwks"
    store.engine.dispose()

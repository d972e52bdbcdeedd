"""`HttpRequest`: what authlib needs of an HTTP request, copied off the reactor thread's request,
and `MalformedRequest`, for input authlib cannot even describe in an error."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from authlib.oauth2.rfc6749 import OAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6749.util import extract_basic_authorization

from bearerbridge.storage.models import SignIn

# RFC 6749 §5.2: the characters an error_description may hold. authlib raises ValueError rather
# than quote any other in its errors (a parameter it names, say), so a request holding one needs
# an answer of our own.
_DESCRIBABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


class MalformedRequest(Exception):
    """A request whose parameters (or, with `in_credentials`, whose Authorization header) hold
    characters no error may quote: answered invalid_request (invalid_client), never a 503."""

    def __init__(self, in_credentials: bool) -> None:
        super().__init__("The client's credentials hold characters that are not allowed" if in_credentials
                         else "The request's parameters hold characters that are not allowed")
        self.in_credentials = in_credentials


class _Headers(dict[str, str]):
    """Request headers keyed by lower-case name, as authlib looks them up by any case."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class _Payload(OAuth2Payload):
    def __init__(self, datalist: Mapping[str, list[str]]) -> None:
        self._datalist = dict(datalist)
        self._data = {key: values[0] for key, values in self._datalist.items() if values}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> dict[str, list[str]]:
        return self._datalist


class HttpRequest(OAuth2Request):
    """A snapshot of an HTTP request, safe to hand to a pool thread.

    twisted.web merges the query and the form in `request.args`; we keep them apart
    (`args` and `form`, as RFC 6749 says where each parameter belongs) and give
    authlib their union as the payload. `address` is where the request came from
    (`web.site.client_address`), None on a UNIX socket.
    """

    def __init__(self, method: str, uri: str, headers: Mapping[str, str],
                 query: Mapping[str, list[str]], form: Mapping[str, list[str]], address: str | None = None) -> None:
        super().__init__(method, uri, headers=_Headers({k.lower(): v for k, v in headers.items()}))
        self.address = address  # the client's IP address (an IPv6 /64), for throttling and the audit log
        # At /authorize: the browser's sign-in the code is granted under (its time and methods go
        # into the ID token).
        self.sign_in: SignIn | None = None
        # (grant, service): the token this request was answered for, as a use to note (`/userinfo`,
        # a resource server's `/introspect`); set in the pool, noted by the web layer (uses.py).
        self.token_use: tuple[str, str] | None = None
        # Where that use came from when a resource server says so (Dovecot's X-Dovecot-Auth-Remote at
        # `/introspect`, `oauth.endpoints.answered`); else None.
        self.use_address: str | None = None
        self._args = {k: v[0] for k, v in query.items() if v}
        self._form = {k: v[0] for k, v in form.items() if v}
        merged: dict[str, list[str]] = {k: list(v) for k, v in query.items()}
        for key, values in form.items():
            merged.setdefault(key, []).extend(values)
        self.payload = _Payload(merged)

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form

    def claimed_client_id(self) -> str | None:
        """The client id the request names, in its Basic credentials or its form, before anyone
        checks it: for throttling."""
        try:
            basic_id, _ = extract_basic_authorization(self.headers)
        except ValueError:  # credentials that are not UTF-8: no name to count them on
            basic_id = None
        return basic_id or self._form.get("client_id") or None

    def repeated(self) -> str | None:
        """A parameter given more than once, if any: RFC 6749 §3.1 and §3.2 forbid it (which
        of the values would a server read?)."""
        return min((name for name, values in self.payload.datalist.items() if len(values) > 1), default=None)

    def malformed(self) -> MalformedRequest | None:
        """Why authlib could not describe this request in an error, if it could not."""
        if not _DESCRIBABLE.fullmatch(self.headers.get("Authorization") or ""):
            return MalformedRequest(in_credentials=True)
        if any(not _DESCRIBABLE.fullmatch(value) for values in self.payload.datalist.values() for value in values):
            return MalformedRequest(in_credentials=False)
        return None

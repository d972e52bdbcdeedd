"""When each grant (a token family) was last used at each service, and from where (`token_uses`):
the user's "connected apps" (issue 12). Written behind, a batch every few seconds, by
`bearerbridge.uses`; read by the user's own page (`storage.account`).

A batch is what `uses.LastUses` gathered: for each (family, service) the latest (time, address)
noted. It is written as one upsert (SQLite and PostgreSQL: `INSERT ... ON CONFLICT DO UPDATE`)
that keeps the later time, so that instances sharing the database, or a batch delayed behind a
newer one, never move a last use back.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from bearerbridge.storage.apppasswords import FAMILY_PREFIX, orphan_uses
from bearerbridge.storage.schema import token_uses, tokens

# (family, service) -> (when, in seconds since the epoch; the address it came from, if known)
Batch = Mapping[tuple[str, str], tuple[float, str | None]]

_SERVICE_LENGTH = cast(sa.String, token_uses.c.service.type).length or 32
_ADDRESS_LENGTH = cast(sa.String, token_uses.c.address.type).length or 64


@functools.lru_cache(maxsize=4096)  # a batch names the same few addresses over and over: 2 µs each
def stored_address(address: str | None) -> str | None:
    """An address as it is kept: an IP address in its normal form (without an IPv6 zone), or a
    network (`web.site.client_address` counts IPv6 by /64); None for anything else, so that a
    peer's odd `rip` cannot fill the column with text."""
    if not address or len(address) > _ADDRESS_LENGTH:
        return None
    try:
        return str(ipaddress.ip_address(address.partition("%")[0]))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(address, strict=False))
    except ValueError:
        return None


def record(db: Connection, batch: Batch) -> int:
    """Upsert a batch into `token_uses`, each row keeping the later of its time and the stored
    one; how many rows were sent. Rows go in key order, so that two instances writing the same
    grants at once lock them in the same order (PostgreSQL) and cannot wait for each other."""
    latest: dict[tuple[str, str], tuple[int, str | None]] = {}
    for (family, service), (at, address) in batch.items():
        key = (family, service[:_SERVICE_LENGTH])  # a service named past the column's length
        if key not in latest or int(at) >= latest[key][0]:
            latest[key] = (int(at), address)
    if not latest:
        return 0
    insert = (postgresql.insert if db.dialect.name == "postgresql" else sqlite.insert)(token_uses)
    upsert = insert.on_conflict_do_update(
        index_elements=[token_uses.c.family, token_uses.c.service],
        set_={"last_used_at": insert.excluded.last_used_at, "address": insert.excluded.address},
        where=token_uses.c.last_used_at <= insert.excluded.last_used_at)
    db.execute(upsert, [{"family": key[0], "service": key[1], "last_used_at": latest[key][0],
                         "address": stored_address(latest[key][1])} for key in sorted(latest)])
    return len(latest)


def purge(db: Connection) -> int:
    """Delete the uses of grants no token row is left of (purged, or gone with their client or
    user), and of app passwords gone with their user; how many went."""
    orphan = sa.or_(sa.and_(~token_uses.c.family.startswith(FAMILY_PREFIX),
                            ~sa.exists().where(tokens.c.family == token_uses.c.family)), orphan_uses())
    return db.execute(token_uses.delete().where(orphan)).rowcount

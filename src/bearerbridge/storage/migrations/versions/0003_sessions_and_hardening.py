"""Server-side sessions, the resource-server mark, user names and addresses unique whatever their
case, and a refresh token's own scope.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id_digest", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("resource_server", sa.Boolean, nullable=False, server_default=sa.false()))
    # Until now any confidential client could introspect. Those using client credentials are the
    # resource servers of an existing setup (Dovecot, Apache): they keep the right; web apps lose it.
    op.execute("UPDATE clients SET resource_server = TRUE WHERE public = FALSE "
               "AND ' ' || grant_types || ' ' LIKE '% client_credentials %'")
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("refresh_scope", sa.Text))
    _fold_names()


def _fold_names() -> None:
    """Fill the case-folded keys, refusing (with the names to fix) names that would collide."""
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("username_key", sa.String(255)))
        batch.add_column(sa.Column("email_key", sa.String(255)))
    connection = op.get_bind()
    users = sa.table("users", sa.column("id", sa.Integer), sa.column("username", sa.String),
                     sa.column("email", sa.String), sa.column("username_key", sa.String),
                     sa.column("email_key", sa.String))
    seen: dict[str, str] = {}
    for user_id, username, email in connection.execute(sa.select(users.c.id, users.c.username, users.c.email)):
        keys = {username.casefold()} | ({email.casefold()} if email else set())
        for key in keys:
            if seen.get(key, username) != username:
                raise RuntimeError(f"users {seen[key]!r} and {username!r} share the name or address {key!r} "
                                   "but for case; keep one (rename or remove the other), then start again")
            seen[key] = username
        connection.execute(users.update().where(users.c.id == user_id).values(
            username_key=username.casefold(), email_key=email.casefold() if email else None))
    with op.batch_alter_table("users") as batch:
        batch.alter_column("username_key", existing_type=sa.String(255), nullable=False)
        batch.create_unique_constraint("uq_users_username_key", ["username_key"])
        batch.create_unique_constraint("uq_users_email_key", ["email_key"])

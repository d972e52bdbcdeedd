"""OpenID Connect (issue 11): the nonce and sign-in of a code, how a session signed in, a user's
display name, and a client's ID token algorithm and post-logout redirect URIs.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_codes") as table:
        table.add_column(sa.Column("nonce", sa.String(255)))
        table.add_column(sa.Column("auth_time", sa.BigInteger))
        table.add_column(sa.Column("amr", sa.String(64)))
    with op.batch_alter_table("device_codes") as table:
        table.add_column(sa.Column("auth_time", sa.BigInteger))
        table.add_column(sa.Column("amr", sa.String(64)))
    with op.batch_alter_table("sessions") as table:
        table.add_column(sa.Column("amr", sa.String(64), nullable=False, server_default="pwd"))
    with op.batch_alter_table("users") as table:
        table.add_column(sa.Column("display_name", sa.String(255)))
    with op.batch_alter_table("clients") as table:
        table.add_column(sa.Column("id_token_alg", sa.String(16), nullable=False, server_default="ES256"))
        table.add_column(sa.Column("post_logout_redirect_uris", sa.Text, nullable=False, server_default=""))
    op.create_index("ix_auth_codes_nonce", "auth_codes", ["client_id", "nonce"])

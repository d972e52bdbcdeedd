"""PKCE S256 for every client by default (OAuth 2.1): existing clients too; a legacy confidential
client that sends no challenge is let off with `bearerbridge client update ID --no-pkce`.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("pkce_required", sa.Boolean, nullable=False, server_default=sa.true()))

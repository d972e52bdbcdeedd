"""What the consent page shows of a client besides its name (issue 11): its website and logo.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as table:
        table.add_column(sa.Column("website", sa.Text))
        table.add_column(sa.Column("logo_uri", sa.Text))

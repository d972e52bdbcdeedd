"""The admin role (issue 12): a user who may use /admin. The first user the command line creates on
an empty database is one, and `bearerbridge user add --admin` or `user admin NAME --admin` makes
others; a database that has users already gets none, until the operator names one.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as table:
        table.add_column(sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()))

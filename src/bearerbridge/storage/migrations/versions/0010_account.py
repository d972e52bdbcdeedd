"""The user's own page (issue 12): when and where each grant was last used per service, where a
browser session was started from, and two-factor sign-in with TOTP and recovery codes.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_uses",
        sa.Column("family", sa.String(32), primary_key=True),
        sa.Column("service", sa.String(32), primary_key=True),
        sa.Column("last_used_at", sa.BigInteger, nullable=False),
        sa.Column("address", sa.String(64)),
    )
    with op.batch_alter_table("sessions") as table:
        table.add_column(sa.Column("address", sa.String(64)))
        table.add_column(sa.Column("user_agent", sa.String(255)))
    op.create_table(
        "totp_secrets",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sealed", sa.Text, nullable=False),
        sa.Column("confirmed_at", sa.BigInteger),
        sa.Column("last_step", sa.BigInteger),
    )
    op.create_table(
        "recovery_codes",
        sa.Column("code_digest", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("used_at", sa.BigInteger),
    )

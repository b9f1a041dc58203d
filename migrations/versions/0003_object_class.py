"""Object classes with their display colour (QuPath path classes round-trip through it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "object_class",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("color", postgresql.ARRAY(sa.SmallInteger()), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "array_length(color, 1) = 3 AND 0 <= ALL(color) AND 255 >= ALL(color)",
            name="ck_object_class_rgb",
        ),
        sa.PrimaryKeyConstraint("name", name="pk_object_class"),
    )


def downgrade() -> None:
    op.drop_table("object_class")

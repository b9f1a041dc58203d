"""Slide-level spatial statistics (`spatialdb.features.spatial`), one row per slide, filled by a
feature refresh beside `slide_feature`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slide_spatial_feature",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column(
            "computed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("statistics", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slide.id"], name="fk_slide_spatial_feature_slide_id_slide",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name="fk_slide_spatial_feature_run_id_run", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("slide_id", name="pk_slide_spatial_feature"),
    )


def downgrade() -> None:
    op.drop_table("slide_spatial_feature")

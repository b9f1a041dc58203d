"""Nuclei counted per class in square cells (`nucleus_density`: level k's cells are 256 · 2^k
level-0 pixels wide), filled by a feature refresh: the slide viewer draws a slide's low zooms from
it instead of counting a million centroids per tile. Slides refreshed before this migration have none until their next
refresh; the viewer counts their centroids instead.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nucleus_density",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("gx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("gy", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("class", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slide.id"], name="fk_nucleus_density_slide_id_slide",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name="fk_nucleus_density_run_id_run", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "slide_id", "level", "gx", "gy", "class", name="pk_nucleus_density"
        ),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("nucleus_density")

"""Compressed slides (NIC grids of encoder embeddings) and slide-level predictions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slide_embedding",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("encoder_sha256", sa.Text(), nullable=False),
        sa.Column("encoder", sa.Text(), nullable=False),
        sa.Column("source_run_id", sa.Integer(), nullable=True),
        sa.Column("mpp", sa.Double(), nullable=False),
        sa.Column("cell_px", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("cols", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=False),
        sa.Column("tissue_cells", sa.Integer(), nullable=False),
        sa.Column("embeddings", sa.LargeBinary(), nullable=False),
        sa.Column("tissue", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "rows > 0 AND cols > 0 AND channels > 0", name="ck_slide_embedding_shape"
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slide.id"], name="fk_slide_embedding_slide_id_slide", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["source_run_id"], ["run.id"], name="fk_slide_embedding_source_run_id_run",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("slide_id", "encoder_sha256", name="pk_slide_embedding"),
    )
    op.create_table(
        "slide_prediction",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("details", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "task IN ('classification', 'regression')", name="ck_slide_prediction_task"
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slide.id"], name="fk_slide_prediction_slide_id_slide",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("slide_id", "model_sha256", name="pk_slide_prediction"),
    )


def downgrade() -> None:
    op.drop_table("slide_prediction")
    op.drop_table("slide_embedding")

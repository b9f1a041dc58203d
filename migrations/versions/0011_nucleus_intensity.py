"""Stain intensity of each nucleus (`inference.intensity`): haematoxylin and eosin optical density
inside the nucleus and in the ring of cytoplasm around it (mean, standard deviation, 10th, 50th
and 90th percentiles). Ingest fills them; imported nuclei and those stored before stay empty.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = [
    f"{place}{stain}_od_{stat}"
    for place in ("", "cytoplasm_")
    for stain in ("haematoxylin", "eosin")
    for stat in ("mean", "std", "q10", "q50", "q90")
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("nucleus", sa.Column(column, sa.Double(), nullable=True))


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_column("nucleus", column)

"""Shape measurements of every object (`spatialdb.store.morphometry`): equivalent diameter,
major and minor axis, eccentricity, orientation, circularity, solidity and extent.

New loads fill them; objects stored before stay empty until `spatialdb db backfill-morphometry`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OBJECT_TABLES = ("nucleus", "gland", "lumen", "tissue_region")
COLUMNS = (
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "orientation_deg",
    "circularity",
    "solidity",
    "extent",
)


def upgrade() -> None:
    for table in OBJECT_TABLES:
        for column in COLUMNS:
            op.add_column(table, sa.Column(column, sa.Double(), nullable=True))


def downgrade() -> None:
    for table in OBJECT_TABLES:
        for column in COLUMNS:
            op.drop_column(table, column)

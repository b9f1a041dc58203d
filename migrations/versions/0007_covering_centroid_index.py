"""Centroid GiST indexes that cover the columns the gland features read from them.

The nuclei (and lumina) inside each gland are found through the centroid index; with the slide,
class, area and centroid stored in its leaves, that probe is an index-only scan and reads no heap
page (the loader's COPY FREEZE marks the pages all-visible). Rebuilds every slide's centroid
index.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OBJECT_TABLES = ("nucleus", "gland", "lumen", "tissue_region")
INCLUDE = ["slide_id", "class", "area_um2", "centroid"]


def upgrade() -> None:
    for name in OBJECT_TABLES:
        op.drop_index(f"ix_{name}_centroid", table_name=name)
        op.create_index(
            f"ix_{name}_centroid",
            name,
            ["centroid"],
            postgresql_using="gist",
            postgresql_include=INCLUDE,
        )


def downgrade() -> None:
    for name in OBJECT_TABLES:
        op.drop_index(f"ix_{name}_centroid", table_name=name)
        op.create_index(f"ix_{name}_centroid", name, ["centroid"], postgresql_using="gist")

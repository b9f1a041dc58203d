"""Nuclei counted per class in square cells (`nucleus_density`: level k's cells are 256 · 2^k
level-0 pixels wide, up to the level whose cells cover the slide in 32 across), filled by a
feature refresh: the slide viewer draws a slide's low zooms from it instead of counting a million
centroids per tile. The slides already stored get theirs here, from their current runs.

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

#: The same counts as `spatialdb.features.refresh` (frozen here, as migrations are): level 0 from
#: the current runs' nuclei, each level above from the one below.
CELLS = """
INSERT INTO nucleus_density (slide_id, level, gx, gy, class, run_id, n)
SELECT n.slide_id, 0, floor(ST_X(n.centroid) / 256)::integer,
       floor(ST_Y(n.centroid) / 256)::integer, n.class, n.run_id, count(*)
FROM nucleus n JOIN slide s ON s.id = n.slide_id AND s.current_run_id = n.run_id
GROUP BY 1, 2, 3, 4, 5, 6
"""
LEVEL = """
INSERT INTO nucleus_density (slide_id, level, gx, gy, class, run_id, n)
SELECT d.slide_id, d.level + 1, d.gx / 2, d.gy / 2, d.class, d.run_id, sum(d.n)
FROM nucleus_density d JOIN slide s ON s.id = d.slide_id
WHERE d.level = :level AND 256 * 2 ^ :level * 32 < greatest(s.width, s.height)
GROUP BY 1, 2, 3, 4, 5, 6
"""


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
    bind = op.get_bind()
    bind.execute(sa.text(CELLS))
    level = 0
    while bind.execute(sa.text(LEVEL), {"level": level}).rowcount:
        level += 1


def downgrade() -> None:
    op.drop_table("nucleus_density")

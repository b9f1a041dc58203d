"""Initial schema: slides, models, runs and the slide-partitioned object tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import geoalchemy2
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

OBJECT_TABLES = {
    "nucleus": "POLYGON",
    "gland": "POLYGON",
    "lumen": "POLYGON",
    "tissue_region": "MULTIPOLYGON",
}


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    default = None if nullable else sa.text("now()")
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=default)


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    op.create_table(
        "slide",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("file_path", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("width", sa.BigInteger(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("mpp_x", sa.Double(), nullable=False),
        sa.Column("mpp_y", sa.Double(), nullable=False),
        sa.Column("objective_power", sa.Double(), nullable=True),
        sa.Column("vendor", sa.Text(), nullable=True),
        sa.Column("level_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), server_default="registered", nullable=False),
        sa.Column("current_run_id", sa.Integer(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.CheckConstraint("mpp_x > 0 AND mpp_y > 0", name="ck_slide_mpp_positive"),
        sa.CheckConstraint("width > 0 AND height > 0", name="ck_slide_size_positive"),
        sa.CheckConstraint("status IN ('registered', 'ready')", name="ck_slide_status"),
        sa.PrimaryKeyConstraint("id", name="pk_slide"),
        sa.UniqueConstraint("file_path", name="uq_slide_file_path"),
    )
    op.create_index("ix_slide_fingerprint", "slide", ["fingerprint"])
    op.create_table(
        "model",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("preset", sa.Text(), nullable=False),
        sa.Column("weights_hash", sa.Text(), nullable=False),
        sa.Column("class_names", postgresql.JSONB(), nullable=False),
        sa.Column("mpp", sa.Double(), nullable=False),
        sa.Column("info", postgresql.JSONB(), server_default="{}", nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_model"),
        sa.UniqueConstraint("weights_hash", name="uq_model_weights_hash"),
    )
    op.create_table(
        "run",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("parameters", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("timings", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("object_counts", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("load_report", postgresql.JSONB(), server_default="{}", nullable=False),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        sa.CheckConstraint("status IN ('complete', 'superseded')", name="ck_run_status"),
        sa.CheckConstraint("kind IN ('inference', 'import', 'curated')", name="ck_run_kind"),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name="fk_run_model_id_model"),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slide.id"], name="fk_run_slide_id_slide", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_run"),
    )
    op.create_index("ix_run_slide_id", "run", ["slide_id"])
    op.create_foreign_key(
        "fk_slide_current_run_id_run", "slide", "run", ["current_run_id"], ["id"], ondelete="SET NULL"
    )
    for name, geometry_type in OBJECT_TABLES.items():
        _create_object_table(name, geometry_type)


def _create_object_table(name: str, geometry_type: str) -> None:
    """An object table partitioned by slide, with GiST indexes on geometry and centroid."""
    op.create_table(
        name,
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.UUID(), nullable=False),
        sa.Column("class", sa.Text(), nullable=False),
        sa.Column("probability", sa.REAL(), nullable=True),
        sa.Column("area_um2", sa.Double(), nullable=False),
        sa.Column("perimeter_um", sa.Double(), nullable=False),
        sa.Column(
            "geom",
            geoalchemy2.Geometry(geometry_type, srid=0, spatial_index=False),
            nullable=False,
        ),
        sa.Column(
            "centroid",
            geoalchemy2.Geometry("POINT", srid=0, spatial_index=False),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["run_id"], ["run.id"], name=f"fk_{name}_run_id_run"),
        sa.ForeignKeyConstraint(["slide_id"], ["slide.id"], name=f"fk_{name}_slide_id_slide"),
        sa.PrimaryKeyConstraint("slide_id", "id", name=f"pk_{name}"),
        postgresql_partition_by="LIST (slide_id)",
    )
    # GiST: bounding-box pre-filters (&&, ST_Intersects) and KNN (<->) on shapes and centroids.
    op.create_index(f"ix_{name}_geom", name, ["geom"], postgresql_using="gist")
    op.create_index(f"ix_{name}_centroid", name, ["centroid"], postgresql_using="gist")
    op.create_index(f"ix_{name}_slide_id_class", name, ["slide_id", "class"])


def downgrade() -> None:
    for name in reversed(OBJECT_TABLES):
        op.drop_table(name)
    op.drop_constraint("fk_slide_current_run_id_run", "slide", type_="foreignkey")
    op.drop_table("run")
    op.drop_table("model")
    op.drop_table("slide")

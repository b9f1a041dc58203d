"""Feature tables and the SQL functions that fill them (see migrations/sql/0002_features.sql).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from pathlib import Path

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parents[1] / "sql" / "0002_features.sql"


def upgrade() -> None:
    op.execute(SQL.read_text())
    # Slides stored before this revision get their features now.
    op.execute(
        "SELECT refresh_slide_features(id) FROM slide WHERE current_run_id IS NOT NULL ORDER BY id"
    )


def downgrade() -> None:
    for function in (
        "nucleus_features(integer, double precision)",
        "refresh_slide_features(integer)",
        "slide_features(integer)",
        "gland_features(integer, integer, integer)",
    ):
        op.execute(f"DROP FUNCTION {function}")
    op.drop_table("slide_feature")
    op.drop_table("gland_feature")

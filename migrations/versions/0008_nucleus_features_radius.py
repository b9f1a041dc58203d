"""nucleus_features() counts neighbours only when given a radius (sql/0008_nucleus_features.sql).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

import re
from pathlib import Path

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parents[1] / "sql"


def upgrade() -> None:
    op.execute((SQL / "0008_nucleus_features.sql").read_text())


def downgrade() -> None:
    # The body 0002 created, taken from its script.
    script = (SQL / "0002_features.sql").read_text()
    body = re.search(r"CREATE FUNCTION nucleus_features\(.*?\$\$;", script, re.DOTALL)
    op.execute("CREATE OR REPLACE FUNCTION" + body.group(0).removeprefix("CREATE FUNCTION"))

"""Faster gland_features and slide_features, same results (sql/0006_faster_features.sql).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import re
from pathlib import Path

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parents[1] / "sql"


def upgrade() -> None:
    op.execute((SQL / "0006_faster_features.sql").read_text())


def downgrade() -> None:
    # The bodies 0002 created, taken from its script.
    script = (SQL / "0002_features.sql").read_text()
    for name in ("gland_features", "slide_features"):
        body = re.search(rf"CREATE FUNCTION {name}\(.*?\$\$;", script, re.DOTALL)
        op.execute("CREATE OR REPLACE FUNCTION" + body.group(0).removeprefix("CREATE FUNCTION"))

"""The read-only role the dashboard uses: SELECT on every table, present and future.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Roles belong to the whole PostgreSQL cluster. Without the right to create roles (a managed
server), the migration leaves a warning instead, and the dashboard falls back to read-only
transactions as the connecting user.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

READER = "spatialdb_reader"


def upgrade() -> None:
    op.execute(f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
        CREATE ROLE {READER} NOLOGIN;
    END IF;
    EXECUTE format('GRANT {READER} TO %I', current_user);
    GRANT USAGE ON SCHEMA public TO {READER};
    GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER};
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {READER};
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'spatialdb: cannot create or grant role {READER} (%); '
        'the dashboard will use read-only transactions instead', SQLERRM;
END
$$""")


def downgrade() -> None:
    op.execute(f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM {READER};
        REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM {READER};
        REVOKE USAGE ON SCHEMA public FROM {READER};
    END IF;
END
$$""")

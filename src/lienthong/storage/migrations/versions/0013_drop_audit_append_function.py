"""PostgreSQL: drop `lienthong_audit_append`; the node chains audit batches itself

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 06:50:00.000000

The audit writer now computes the hash chain in Python on both databases and appends a batch with one
conditional statement (security/audit.py), so the chain formula exists in one place, the code that
`lienthong audit verify` also uses. The function of migration 0008 is no longer called.
"""

from __future__ import annotations

import importlib

from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS lienthong_audit_append(json)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        earlier = importlib.import_module('lienthong.storage.migrations.versions.0008_audit_append_function')
        op.execute(earlier.APPEND)

"""audit_journal: the segments of the local audit journal and how far each has been drained

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 23:20:00.000000

Read audits are made durable in an fdatasync'd local journal before the answer is given and drained into
audit_log in large batches (security/audit_journal.py); the drained offset of each segment is committed
with the rows it moved.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_journal',
                    sa.Column('segment', sa.String(length=128), nullable=False),
                    sa.Column('drained', sa.BigInteger(), nullable=False),
                    sa.Column('created', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('segment'))


def downgrade() -> None:
    op.drop_table('audit_journal')

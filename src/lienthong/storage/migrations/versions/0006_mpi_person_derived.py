"""mpi_person keeps the matcher's normalised comparison values

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows indexed before this revision are normalised on the fly until `lienthong mpi index`.
    with op.batch_alter_table('mpi_person', schema=None) as batch_op:
        batch_op.add_column(sa.Column('derived', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('mpi_person', schema=None) as batch_op:
        batch_op.drop_column('derived')

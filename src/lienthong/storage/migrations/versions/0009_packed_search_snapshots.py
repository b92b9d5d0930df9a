"""Search snapshots: the ordered result keys packed into one column instead of a row per result, and
continued on demand (`resume`) for searches in the default order; the total may be unknown

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 00:10:00.000000

Snapshots live an hour and are rebuilt by searching again, so the ones open at the upgrade are dropped
(a client paging through one gets 410 and searches again) rather than converted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table('search_entry')
    op.execute('DELETE FROM search_set')
    with op.batch_alter_table('search_set', schema=None) as batch_op:
        batch_op.add_column(sa.Column('entries', sa.LargeBinary(), nullable=False, server_default=sa.text("''")))
        batch_op.add_column(sa.Column('resume', sa.Text(), nullable=True))
        batch_op.alter_column('total', existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute('DELETE FROM search_set')
    with op.batch_alter_table('search_set', schema=None) as batch_op:
        batch_op.alter_column('total', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('resume')
        batch_op.drop_column('entries')
    op.create_table('search_entry',
                    sa.Column('sid', sa.String(length=40), nullable=False),
                    sa.Column('ord', sa.Integer(), nullable=False),
                    sa.Column('res_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
                    sa.Column('version', sa.Integer(), nullable=False),
                    sa.Column('mode', sa.String(length=8), nullable=False),
                    sa.ForeignKeyConstraint(['sid'], ['search_set.sid'], ondelete='CASCADE'),
                    sa.PrimaryKeyConstraint('sid', 'ord'))

"""mpi_block: one (key, patient_id) index instead of key alone, so $match reads blocks from the index

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 17:00:00.000000
"""

from __future__ import annotations

from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('mpi_block', schema=None) as batch_op:
        batch_op.create_index('ix_mpi_block_key_patient', ['key', 'patient_id'], unique=False)
        batch_op.drop_index('ix_mpi_block_key')
    if op.get_bind().dialect.name == 'postgresql':
        # Index-only scans skip the heap only on pages the visibility map marks all-visible; the default
        # insert-triggered autovacuum waits for 20 % new rows (~200,000 patients at 1 M), so ask for 1 %.
        op.execute('ALTER TABLE mpi_block SET (autovacuum_vacuum_insert_scale_factor = 0.01)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE mpi_block RESET (autovacuum_vacuum_insert_scale_factor)')
    with op.batch_alter_table('mpi_block', schema=None) as batch_op:
        batch_op.create_index('ix_mpi_block_key', ['key'], unique=False)
        batch_op.drop_index('ix_mpi_block_key_patient')

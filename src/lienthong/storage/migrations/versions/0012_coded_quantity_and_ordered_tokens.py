"""Paired rows for token$quantity composites (`sp_coded_quantity`), and the token index with res_pk last

Revision ID: 0012
Revises: 0009
Create Date: 2026-11-28 02:30:00.000000

`sp_coded_quantity` holds one row per code and value of the same element of a token$quantity composite
(Observation code-value-quantity and its kind), so "this code above this value" reads one index range. The
upgrade fills it from the composites' component rows already stored (paired by `grp`), which is what
extraction now writes for new versions.

The token index gains res_pk as its last column: one code's rows come in resource order and from the index
alone, so the first page of a population-wide code search stops early instead of visiting every row's heap
page. The insert-triggered autovacuum of both tables is asked for at 1 % new rows (not 20 %) so that index-only
scans find the pages marked all-visible.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0012'
down_revision = '0009'
branch_labels = None
depends_on = None


def _backfill() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text('SELECT 1 FROM sp_quantity LIMIT 1')).first() is None:
        return  # a new database: nothing to pair, and no need to load the definitions
    from lienthong.fhir.search_params import registry

    for params in registry().by_type.values():
        for p in params.values():
            if not p.codes_a_quantity:
                continue
            bind.execute(sa.text(
                'INSERT INTO sp_coded_quantity (res_pk, pkey, grp, tsystem, tcode, value, system, code, unit) '
                'SELECT q.res_pk, :key, q.grp, t.system, t.code, q.value, q.system, q.code, q.unit '
                'FROM sp_quantity q JOIN sp_token t ON t.res_pk = q.res_pk AND t.grp = q.grp AND t.pkey = :token '
                'WHERE q.pkey = :quantity AND (t.code IS NOT NULL OR t.system IS NOT NULL)'),
                {"key": p.key, "token": p.component_key(0), "quantity": p.component_key(1)})


def upgrade() -> None:
    op.create_table('sp_coded_quantity',
                    sa.Column('res_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
                    sa.Column('pkey', sa.BigInteger(), nullable=False),
                    sa.Column('grp', sa.SmallInteger(), nullable=True),
                    sa.Column('tsystem', sa.String(length=255), nullable=True),
                    sa.Column('tcode', sa.String(length=255), nullable=True),
                    sa.Column('value', sa.Float(), nullable=False),
                    sa.Column('system', sa.String(length=255), nullable=True),
                    sa.Column('code', sa.String(length=255), nullable=True),
                    sa.Column('unit', sa.String(length=255), nullable=True))
    _backfill()
    with op.batch_alter_table('sp_coded_quantity', schema=None) as batch_op:
        batch_op.create_index('ix_sp_coded_quantity_res', ['res_pk'], unique=False)
        batch_op.create_index('ix_sp_coded_quantity_pkey_tcode_value', ['pkey', 'tcode', 'value'], unique=False,
                              postgresql_include=['res_pk', 'tsystem', 'system', 'code', 'unit'])
    with op.batch_alter_table('sp_token', schema=None) as batch_op:
        batch_op.create_index('ix_sp_token_pkey_code_system_res_pk', ['pkey', 'code', 'system', 'res_pk'],
                              unique=False)
        batch_op.drop_index('ix_sp_token_pkey_code_system')
    if op.get_bind().dialect.name == 'postgresql':
        for table in ('sp_token', 'sp_coded_quantity'):
            op.execute(f'ALTER TABLE {table} SET (autovacuum_vacuum_insert_scale_factor = 0.01)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE sp_token RESET (autovacuum_vacuum_insert_scale_factor)')
    with op.batch_alter_table('sp_token', schema=None) as batch_op:
        batch_op.create_index('ix_sp_token_pkey_code_system', ['pkey', 'code', 'system'], unique=False)
        batch_op.drop_index('ix_sp_token_pkey_code_system_res_pk')
    op.drop_table('sp_coded_quantity')

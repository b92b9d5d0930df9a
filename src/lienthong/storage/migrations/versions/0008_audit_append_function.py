"""PostgreSQL: append a batch of audit records to the hash chain in one statement

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 00:00:00.000000

Why a server-side function: an audit batch used to be six statements (head read under lock, two
inserts, head update, BEGIN/COMMIT) with the chain computed in the client between them. That is two
round trips and about 1 ms of driver work per batch, and every read waits for its batch. The function
takes the head lock, chains and inserts the records, and moves the head, so a batch is one statement.
It computes exactly `security.audit._chain` (checked by `AuditTrail.verify`, which recomputes it in
Python): sha256(prev | seq | recorded | actor | facility | action | outcome | patients | + sha256(body)),
with `joined` the record's sorted patient ids joined by commas as the client sends them (joining them
here cost a fifth of the call) and `patients` the same ids as an array, one audit_patient row each.
"""

from __future__ import annotations

from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

APPEND = r"""
CREATE OR REPLACE FUNCTION lienthong_audit_append(batch json) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    head_seq bigint;
    head_hash text;
    r record;
    stamped bytea;
    digest text;
BEGIN
    SELECT seq, hash INTO head_seq, head_hash FROM audit_head WHERE id = 1 FOR UPDATE;
    FOR r IN SELECT * FROM json_to_recordset(batch) AS x(recorded bigint, actor text, facility text, action text,
                                                         outcome text, body text, patients json,
                                                         joined text)
    LOOP
        head_seq := head_seq + 1;
        -- the AuditEvent's id is its sequence number, appended as the body's last member
        stamped := convert_to(left(r.body, -1) || ',"id":"' || head_seq || '"}', 'UTF8');
        digest := encode(sha256(convert_to(
            head_hash || '|' || head_seq || '|' || r.recorded || '|' || coalesce(r.actor, '') || '|' ||
            coalesce(r.facility, '') || '|' || r.action || '|' || r.outcome || '|' ||
            r.joined || '|', 'UTF8') || sha256(stamped)), 'hex');
        INSERT INTO audit_log (seq, recorded, actor, facility, action, outcome, body, prev_hash, hash)
        VALUES (head_seq, r.recorded, r.actor, r.facility, r.action, r.outcome, stamped, head_hash, digest);
        INSERT INTO audit_patient (seq, patient_id)
        SELECT head_seq, p FROM json_array_elements_text(r.patients) AS e(p);
        head_hash := digest;
    END LOOP;
    UPDATE audit_head SET seq = head_seq, hash = head_hash WHERE id = 1;
    RETURN head_seq;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(APPEND)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS lienthong_audit_append(json)')

"""Tables of the exchange: replay guard, transactional outbox, idempotent inbox, resumable uploads.

Why on the shared `metadata`: the outbox row must commit in the same
transaction as the clinical write that produced it, so it has to live in the
node's own database; one Alembic history covers it. Times are microseconds
since the epoch (UTC), as everywhere else in the schema.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Table, Text

from lienthong.storage.schema import metadata

# Request nonces already accepted, keyed "<facility code>:<nonce>"; rows older than twice the
# allowed clock skew can no longer be replayed (the timestamp check rejects them) and are purged.
exchange_nonce = Table(
    "exchange_nonce",
    metadata,
    Column("nonce", String(96), primary_key=True),
    Column("seen", BigInteger, nullable=False),
    Index("ix_exchange_nonce_seen", "seen"),
)

# Messages waiting to leave. One ordered stream per (dest, patient_key); `seq` numbers it.
# status: pending | sending | sent | failed (waiting for a retry) | dead (rejected or gave up).
# payload is stored compressed; sha256 and size describe those stored (wire) bytes.
outbox = Table(
    "outbox",
    metadata,
    Column("msg_id", String(40), primary_key=True),
    Column("dest", String(16), nullable=False),
    Column("patient_key", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("next_attempt", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("status", String(8), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Index("ux_outbox_stream_seq", "dest", "patient_key", "seq", unique=True),
    Index("ix_outbox_status_due", "status", "next_attempt"),
)

# Messages that arrived. The primary key is the deduplication: a retried message finds its row and
# gets the same answer. status: received | processed | rejected. The payload (as received, still
# compressed) may be cleared once processed; the row stays so late duplicates are still recognised.
inbox = Table(
    "inbox",
    metadata,
    Column("msg_id", String(40), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("received", BigInteger, nullable=False),
    Column("status", String(10), nullable=False),
    Column("reason", Text, nullable=True),
    Column("payload", LargeBinary, nullable=True),
    Index("ix_inbox_status_received", "status", "received"),
    Index("ix_inbox_received", "received"),
)

# Resumable uploads in progress. `source` binds an upload to the authenticated sender so no other
# node can append to it. The bytes live in `upload_chunk`, one row per chunk: appending to a single
# BLOB column rewrites the whole value each time (quadratic for a 50 MB upload in 256 KiB chunks).
upload = Table(
    "upload",
    metadata,
    Column("msg_id", String(40), primary_key=True),
    Column("source", String(16), nullable=False),
    Column("dest", String(16), nullable=False),
    Column("patient_key", String(128), nullable=False),
    Column("total_size", BigInteger, nullable=False),
    Column("received_size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created", BigInteger, nullable=False),
)
upload_chunk = Table(
    "upload_chunk",
    metadata,
    Column("msg_id", String(40), primary_key=True),
    Column("pos", BigInteger, primary_key=True),  # byte offset of this chunk
    Column("data", LargeBinary, nullable=False),
)

TABLES = (exchange_nonce, outbox, inbox, upload, upload_chunk)

"""The relational schema: versioned resources plus one index table per search-parameter type.

Why this shape (after HAPI JPA and Blaze): every version is kept in
`resource_version` (nothing is overwritten, deletes are logical), `resource`
points at the current version, and search runs on narrow typed index tables
keyed by a 64-bit parameter key. The same schema serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

metadata = MetaData()

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL wants a BIGINT identity.
PK = BigInteger().with_variant(Integer(), "sqlite")

resource = Table(
    "resource",
    metadata,
    Column("res_pk", PK, primary_key=True, autoincrement=True),
    Column("rtype", String(64), nullable=False),
    Column("rid", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),  # microseconds since epoch, UTC
    Column("deleted", Boolean, nullable=False, default=False),
    Index("ux_resource_type_id", "rtype", "rid", unique=True),
    Index("ix_resource_type_updated", "rtype", "last_updated"),
)

resource_version = Table(
    "resource_version",
    metadata,
    Column("res_pk", PK, ForeignKey("resource.res_pk"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("rtype", String(64), nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST, PUT, PATCH, DELETE
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", LargeBinary, nullable=True),  # the stored JSON, meta included; empty for a delete
    Index("ix_version_updated", "last_updated"),
    Index("ix_version_type_updated", "rtype", "last_updated"),
)


def _index_table(
    name: str, *columns: Column[object], indexes: list[tuple[str, ...]], pattern: tuple[str, ...] = (),
    include: tuple[str, ...] = (),
) -> Table:
    table = Table(
        name,
        metadata,
        Column("res_pk", PK, nullable=False),
        Column("pkey", BigInteger, nullable=False),
        Column("grp", SmallInteger, nullable=True),  # element ordinal, pairs composite components
        *columns,
        Index(f"ix_{name}_res", "res_pk"),
    )
    for cols in indexes:
        # PostgreSQL needs text_pattern_ops for LIKE 'prefix%' to use the index under any collation.
        ops = {c: "text_pattern_ops" for c in cols if c in pattern}
        Index(f"ix_{name}_{'_'.join(cols)}", *[table.c[c] for c in cols], postgresql_ops=ops,
              postgresql_include=list(include))
    return table


sp_string = _index_table(
    "sp_string",
    Column("norm", String(255), nullable=False),  # folded: lower case, no diacritics
    Column("exact", String(255), nullable=False),
    indexes=[("pkey", "norm")],
    pattern=("norm",),
)
sp_token = _index_table(
    "sp_token",
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("text", String(255), nullable=True),
    # res_pk last: the rows of one code come in resource order and straight from the index (no heap visit)
    indexes=[("pkey", "code", "system", "res_pk"), ("pkey", "text")],
    pattern=("text",),
)
sp_date = _index_table(
    "sp_date",
    Column("lo", BigInteger, nullable=False),
    Column("hi", BigInteger, nullable=False),
    indexes=[("pkey", "lo"), ("pkey", "hi")],
)
sp_number = _index_table(
    "sp_number",
    Column("value", Float, nullable=False),
    indexes=[("pkey", "value")],
)
sp_quantity = _index_table(
    "sp_quantity",
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("unit", String(255), nullable=True),
    indexes=[("pkey", "value")],
)
# token$quantity composites (code-value-quantity): a code and a value of the same element in one row, so that
# "this code, above this value" is one range of (pkey, tcode, value) instead of a join of two large sets.
sp_coded_quantity = _index_table(
    "sp_coded_quantity",
    Column("tsystem", String(255), nullable=True),
    Column("tcode", String(255), nullable=True),
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("unit", String(255), nullable=True),
    indexes=[("pkey", "tcode", "value")],
    include=("res_pk", "tsystem", "system", "code", "unit"),  # PostgreSQL answers from the index alone
)
sp_uri = _index_table(
    "sp_uri",
    Column("uri", String(255), nullable=False),
    indexes=[("pkey", "uri")],
)
sp_reference = _index_table(
    "sp_reference",
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("url", String(255), nullable=True),
    indexes=[("pkey", "target_id", "target_type"), ("target_id", "target_type")],
)

INDEX_TABLES = {
    "string": sp_string,
    "token": sp_token,
    "date": sp_date,
    "number": sp_number,
    "quantity": sp_quantity,
    "uri": sp_uri,
    "reference": sp_reference,
    "coded_quantity": sp_coded_quantity,  # not a parameter type: rows of token$quantity composites
}

# Search result snapshots: paging stays stable while others write.
search_set = Table(
    "search_set",
    metadata,
    Column("sid", String(40), primary_key=True),
    Column("created", BigInteger, nullable=False),
    Column("total", Integer, nullable=True),  # unknown until the end was reached (or _total=accurate)
    Column("query", Text, nullable=False),  # the canonical self link, for rebuilding links
    Column("owner", String(128), nullable=True),  # who searched: only they may page through it
    # The ordered (res_pk int64, version int32) keys, little-endian, 12 bytes each (interactions.service).
    Column("entries", LargeBinary, nullable=False),
    # How to continue a snapshot in res_pk order ({"type", "types", "params"} as JSON); null when complete.
    Column("resume", Text, nullable=True),
    Index("ix_search_set_created", "created"),
)
# Bulk Data export jobs and their NDJSON files.
export_job = Table(
    "export_job",
    metadata,
    Column("job_id", String(40), primary_key=True),
    Column("status", String(16), nullable=False),  # accepted, running, completed, failed, cancelled
    Column("request", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("transaction_time", BigInteger, nullable=False),
    Column("finished", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Column("owner", String(128), nullable=True),
)
export_file = Table(
    "export_file",
    metadata,
    Column("job_id", String(40), ForeignKey("export_job.job_id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("rtype", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

# ---- Identity, access control and audit (issue: who may see what) -------------------------------

app_user = Table(
    "app_user",
    metadata,
    Column("user_id", String(40), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("display_name", String(255), nullable=True),
    Column("facility", String(16), nullable=True),  # 5-digit facility code the user acts for
    Column("practitioner_id", String(64), nullable=True),  # Practitioner resource id
    Column("licence_no", String(64), nullable=True),  # practising-licence number
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", BigInteger, nullable=True),
    Column("created", BigInteger, nullable=False),
)
role_assignment = Table(
    "role_assignment",
    metadata,
    Column("assignment_id", PK, primary_key=True, autoincrement=True),
    Column("user_id", String(40), ForeignKey("app_user.user_id"), nullable=False, index=True),
    Column("role", String(32), nullable=False),
    Column("facility", String(16), nullable=True),
    Column("window", Text, nullable=True),  # JSON: {"days": "mon-fri", "start": "07:00", "end": "17:00"}
    Column("valid_from", BigInteger, nullable=True),
    Column("valid_until", BigInteger, nullable=True),
)
app_client = Table(
    "app_client",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("secret_hash", String(255), nullable=False),
    Column("facility", String(16), nullable=True),
    Column("scopes", Text, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created", BigInteger, nullable=False),
)
signing_key = Table(
    "signing_key",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("private_jwk", Text, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("retired", BigInteger, nullable=True),  # still verifies until tokens signed with it expire
)
revoked_token = Table(
    "revoked_token",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires", BigInteger, nullable=False),
)
auth_code = Table(
    "auth_code",
    metadata,
    Column("code", String(64), primary_key=True),
    Column("user_id", String(40), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("challenge", String(128), nullable=False),
    Column("scope", Text, nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("expires", BigInteger, nullable=False),
)
break_glass = Table(
    "break_glass",
    metadata,
    Column("grant_id", String(40), primary_key=True),
    Column("user_id", String(40), nullable=False, index=True),
    Column("patient_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("started", BigInteger, nullable=False),
    Column("expires", BigInteger, nullable=False),
    Column("reviewed_by", String(40), nullable=True),
    Column("reviewed_at", BigInteger, nullable=True),
)
patient_facility = Table(
    "patient_facility",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("facility", String(16), primary_key=True),
    Column("reason", String(16), nullable=False),  # registered | treated | transfer
    Column("since", BigInteger, nullable=False),
)
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("recorded", BigInteger, nullable=False),
    Column("actor", String(128), nullable=True),
    Column("facility", String(16), nullable=True),
    Column("action", String(32), nullable=False),  # BALP-style: read, search, create, login, ...
    Column("outcome", String(8), nullable=False),  # FHIR AuditEvent.outcome: 0, 4, 8, 12
    Column("body", LargeBinary, nullable=False),  # the AuditEvent JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_recorded", "recorded"),
    Index("ix_audit_actor", "actor", "recorded"),
)
audit_patient = Table(
    "audit_patient",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("patient_id", String(64), primary_key=True),
    Index("ix_audit_patient", "patient_id", "seq"),
)
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)
# Each audit journal segment (security/audit_journal.py) and how far it has been drained into audit_log, committed
# with the rows it moved: a crash neither loses nor doubles a record. Rows stay after their file is deleted, so a
# segment is never drained twice, and a file this database never registered is never drained at all.
audit_journal = Table(
    "audit_journal",
    metadata,
    Column("segment", String(128), primary_key=True),
    Column("drained", BigInteger, nullable=False),
    Column("created", BigInteger, nullable=False),
)

# ---- Master patient index (issue: patient identity across the province) ---------------------------

mpi_person = Table(
    "mpi_person",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("record", Text, nullable=False),  # the matcher's PersonRecord as JSON
    # Its normalised comparison values (records.derive) as JSON, so $match does not re-normalise candidates.
    Column("derived", Text, nullable=True),
    Column("updated", BigInteger, nullable=False),
)
mpi_block = Table(
    "mpi_block",
    metadata,
    Column("key", String(160), nullable=False),
    Column("patient_id", String(64), nullable=False),
    # (key, patient_id), not key alone: $match reads a key's members from the index only, without a
    # random heap page per member (a crowded key has ~1,500 members at 1 M patients).
    Index("ix_mpi_block_key_patient", "key", "patient_id"),
    Index("ix_mpi_block_patient", "patient_id"),
)
mpi_review = Table(
    "mpi_review",
    metadata,
    Column("review_id", String(40), primary_key=True),
    Column("left_id", String(64), nullable=False),
    Column("right_id", String(64), nullable=False),
    Column("score", Float, nullable=False),
    Column("explanation", Text, nullable=False),  # JSON list of {field, level, weight}
    Column("status", String(16), nullable=False),  # pending | match | no-match
    Column("source", String(64), nullable=True),  # what raised it (match, dedupe, exchange package id)
    Column("created", BigInteger, nullable=False),
    Column("decided_by", String(128), nullable=True),
    Column("decided_at", BigInteger, nullable=True),
    Index("ix_mpi_review_status", "status", "created"),
)
mpi_merge = Table(
    "mpi_merge",
    metadata,
    Column("merge_id", String(40), primary_key=True),
    Column("source_id", String(64), nullable=False),
    Column("target_id", String(64), nullable=False),
    Column("source_version", Integer, nullable=False),  # versions before the merge, restored by unmerge
    Column("target_version", Integer, nullable=False),
    Column("merged_by", String(128), nullable=True),
    Column("merged_at", BigInteger, nullable=False),
    Column("unmerged_by", String(128), nullable=True),
    Column("unmerged_at", BigInteger, nullable=True),
)

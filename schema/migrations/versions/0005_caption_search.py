"""Full-text search over captions, their alternatives and tags (`capworks search`).

PostgreSQL: a stored generated `tsvector` column `captions.search` (the caption and its tags
weighted A, the alternatives C, English stemming) with a GIN index. SQLite: an FTS5 table
`captions_fts` (porter stemming) whose rowid is the caption's id, kept in step by triggers on
insert, update (an upsert's DO UPDATE fires it) and delete (a cascade from images fires it too).
Both backends get an index on `captions.created` for the date filters and `capworks status`.

A later migration that alters `captions` with a batch (table-copying) operation on SQLite drops
these triggers with the old table and must create them again (`create_sqlite_triggers`).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PG_DOCUMENT = (
    "setweight(to_tsvector('english'::regconfig, text), 'A') || "
    "setweight(jsonb_to_tsvector('english'::regconfig, tags, '[\"key\"]'), 'A') || "
    "setweight(json_to_tsvector('english'::regconfig, alternatives, '[\"string\"]'), 'C')"
)
# What the FTS5 table holds for a caption row `r` (NEW or a table alias).
SQLITE_ALTERNATIVES = (
    "(SELECT group_concat(json_extract(a.value, '$.text'), ' ') FROM json_each({r}.alternatives) a)"
)
SQLITE_TAGS = "(SELECT group_concat(t.key, ' ') FROM json_each({r}.tags) t)"
SQLITE_ROW = "{r}.id, {r}.text, " + SQLITE_ALTERNATIVES + ", " + SQLITE_TAGS
FTS_COLUMNS = "rowid, text, alternatives, tags"


def upgrade() -> None:
    op.create_index(op.f("ix_captions_created"), "captions", ["created"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"ALTER TABLE captions ADD COLUMN search tsvector "
            f"GENERATED ALWAYS AS ({PG_DOCUMENT}) STORED"
        )
        op.execute("CREATE INDEX ix_captions_search ON captions USING gin (search)")
        return
    op.execute(
        "CREATE VIRTUAL TABLE captions_fts USING fts5("
        "text, alternatives, tags, tokenize = 'porter unicode61')"
    )
    op.execute(
        f"INSERT INTO captions_fts ({FTS_COLUMNS}) "  # noqa: S608 - SQL from this file's constants
        f"SELECT {SQLITE_ROW.format(r='captions')} FROM captions"
    )
    create_sqlite_triggers()


def create_sqlite_triggers() -> None:
    """The triggers that keep `captions_fts` in step with `captions` on SQLite."""
    new_row = SQLITE_ROW.format(r="NEW")
    op.execute(
        "CREATE TRIGGER captions_fts_insert AFTER INSERT ON captions BEGIN "  # noqa: S608 - SQL from this file's constants
        f"INSERT INTO captions_fts ({FTS_COLUMNS}) VALUES ({new_row}); END"
    )
    op.execute(
        "CREATE TRIGGER captions_fts_update AFTER UPDATE ON captions BEGIN "  # noqa: S608 - SQL from this file's constants
        "DELETE FROM captions_fts WHERE rowid = OLD.id; "
        f"INSERT INTO captions_fts ({FTS_COLUMNS}) VALUES ({new_row}); END"
    )
    op.execute(
        "CREATE TRIGGER captions_fts_delete AFTER DELETE ON captions BEGIN "
        "DELETE FROM captions_fts WHERE rowid = OLD.id; END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_captions_search")
        op.execute("ALTER TABLE captions DROP COLUMN search")
    else:
        for trigger in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER captions_fts_{trigger}")
        op.execute("DROP TABLE captions_fts")
    op.drop_index(op.f("ix_captions_created"), "captions")

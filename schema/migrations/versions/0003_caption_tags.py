"""Tags move from their own table into a `tags` column on captions: {lemma: score}.

A tag row per word cost a heap tuple, three index entries and two foreign-key checks, and tags
are most of what the worker writes: the write path spent two thirds of its database time there
(bench/db_write.py). One JSON object per caption is written with the caption. On PostgreSQL it
is JSONB with a GIN index, so `captions.tags ? 'dog'` finds tagged captions by index.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TAGS = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table("captions") as batch:
        batch.add_column(sa.Column("tags", TAGS, nullable=False, server_default="{}"))
    aggregate = "jsonb_object_agg" if postgres else "json_group_object"
    op.execute(
        f"UPDATE captions SET tags = (SELECT {aggregate}(t.tag, t.score) FROM tags t "  # noqa: S608 - SQL from this file's constants
        "WHERE t.caption_id = captions.id) "
        "WHERE EXISTS (SELECT 1 FROM tags t WHERE t.caption_id = captions.id)"
    )
    op.drop_table("tags")
    if postgres:
        op.create_index(op.f("ix_captions_tags"), "captions", ["tags"], postgresql_using="gin")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("caption_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["caption_id"],
            ["captions.id"],
            ondelete="CASCADE",
            name=op.f("fk_tags_caption_id_captions"),
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], ondelete="CASCADE", name=op.f("fk_tags_image_id_images")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("caption_id", "tag", name=op.f("uq_tags_caption_id_tag")),
    )
    op.create_index(op.f("ix_tags_image_id"), "tags", ["image_id"])
    op.create_index(op.f("ix_tags_tag"), "tags", ["tag"])
    each = "jsonb_each_text(c.tags) AS e (key, value)" if postgres else "json_each(c.tags) AS e"
    op.execute(
        "INSERT INTO tags (image_id, caption_id, tag, score) "  # noqa: S608 - SQL from this file's constants
        f"SELECT c.image_id, c.id, e.key, CAST(e.value AS FLOAT) FROM captions c, {each}"
    )
    if postgres:
        op.drop_index(op.f("ix_captions_tags"), "captions")
    with op.batch_alter_table("captions") as batch:
        batch.drop_column("tags")

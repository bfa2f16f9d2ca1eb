"""Images, captions, tags and failures.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("bucket", sa.String(255)),
        sa.Column("key", sa.String(1024)),
        sa.Column("version_id", sa.String(255)),
        sa.Column("etag", sa.String(255)),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("width_px", sa.Integer()),
        sa.Column("height_px", sa.Integer()),
        sa.Column("first_seen", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("uri", name=op.f("uq_images_uri")),
    )
    op.create_table(
        "captions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(512), nullable=False),
        sa.Column("revision", sa.String(255), nullable=False),
        sa.Column("settings_hash", sa.String(64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("alternatives", sa.JSON(), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            ondelete="CASCADE",
            name=op.f("fk_captions_image_id_images"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captions")),
        sa.UniqueConstraint(
            "image_id",
            "model_id",
            "revision",
            "settings_hash",
            name=op.f("uq_captions_image_id_model_id_revision_settings_hash"),
        ),
    )
    op.create_index(op.f("ix_captions_image_id"), "captions", ["image_id"])
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
    op.create_table(
        "failures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_seen", TZ, nullable=False),
        sa.Column("last_seen", TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            ondelete="CASCADE",
            name=op.f("fk_failures_image_id_images"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failures")),
        sa.UniqueConstraint("image_id", name=op.f("uq_failures_image_id")),
    )
    op.create_index(op.f("ix_failures_code"), "failures", ["code"])


def downgrade() -> None:
    op.drop_table("failures")
    op.drop_table("tags")
    op.drop_table("captions")
    op.drop_table("images")

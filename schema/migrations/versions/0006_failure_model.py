"""Dead letters know their model: `failures` keyed by image and caption identity.

A dead letter names the caption identity (model id, revision, generation settings hash) it was
written for, one per image and identity like `captions`, so that only a caption by the same
identity clears it and `capworks dlq replay` sends jobs that name it. Letters written before
this revision have no identity (""): any caption still clears them, and their replay names none.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

IDENTITY = ("model_id", "revision", "settings_hash")


def upgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.add_column(sa.Column("model_id", sa.String(512), nullable=False, server_default=""))
        batch.add_column(sa.Column("revision", sa.String(255), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("settings_hash", sa.String(64), nullable=False, server_default="")
        )
        batch.drop_constraint(op.f("uq_failures_image_id"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_failures_image_id_model_id_revision_settings_hash"), ["image_id", *IDENTITY]
        )


def downgrade() -> None:
    # One letter per image again: the most recent one is kept.
    op.execute(
        "DELETE FROM failures WHERE EXISTS (SELECT 1 FROM failures later "
        "WHERE later.image_id = failures.image_id AND (later.last_seen > failures.last_seen "
        "OR (later.last_seen = failures.last_seen AND later.id > failures.id)))"
    )
    with op.batch_alter_table("failures") as batch:
        batch.drop_constraint(
            op.f("uq_failures_image_id_model_id_revision_settings_hash"), type_="unique"
        )
        batch.create_unique_constraint(op.f("uq_failures_image_id"), ["image_id"])
        for column in IDENTITY:
            batch.drop_column(column)

"""Dead-letter details, bad messages and resumable crawls.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.add_column(sa.Column("job_id", sa.String(128)))
        batch.add_column(sa.Column("traceback", sa.Text()))
        batch.add_column(sa.Column("replays", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_replayed", TZ))
    op.create_table(
        "bad_messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_key", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("received", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bad_messages")),
    )
    op.create_table(
        "crawls",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_key", sa.Text()),
        sa.Column("pending_job", sa.Text()),
        sa.Column("listed", sa.BigInteger(), nullable=False),
        sa.Column("skipped", sa.BigInteger(), nullable=False),
        sa.Column("enqueued", sa.BigInteger(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("created", TZ, nullable=False),
        sa.Column("updated", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_crawls")),
    )


def downgrade() -> None:
    op.drop_table("crawls")
    op.drop_table("bad_messages")
    with op.batch_alter_table("failures") as batch:
        for column in ("last_replayed", "replays", "traceback", "job_id"):
            batch.drop_column(column)

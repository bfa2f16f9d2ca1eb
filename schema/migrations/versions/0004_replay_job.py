"""Dead letters remember the job that replays them (`failures.replay_job`).

`capworks dlq replay` records the job id on the rows before it publishes the job, so a run cut
off between the two sends that job again under the same id, and a second run sends nothing twice.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.add_column(sa.Column("replay_job", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.drop_column("replay_job")

"""Images keep a dataset's own columns; exports keep their high-water marks.

`capworks enqueue TABLE --id-col C --keep-cols a,b` reads tables that already name their
images (an img2dataset `url,key,caption` CSV, a Parquet manifest): the row's identifier goes
to `images.source_id` and the kept columns to `images.extra` (JSON), so an export can hand the
captions back under the dataset's own keys. `exports` holds, per named incremental export
(`capworks export --mark NAME`), the `created` time up to which captions were exported.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source_id", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("extra", sa.JSON(), nullable=True))
    op.create_table(
        "exports",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("high_water", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_exports")),
    )


def downgrade() -> None:
    op.drop_table("exports")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("extra")
        batch.drop_column("source_id")

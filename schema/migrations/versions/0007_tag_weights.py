"""Tags weighted by hypothesis probability: every stored caption's tags recomputed.

Until this revision a tag's score was the share of beam hypotheses containing it, so the
caption's own colour scored like each colour the beam rejected. `schema.tags.derive_tags` now
weighs each hypothesis by the softmax of the beam scores; the caption's score and its
alternatives' are stored, so the tags are recomputed from them, a page of rows at a time. The
search vector (PostgreSQL's generated column, SQLite's FTS5 triggers) follows the update.
Downgrade recomputes the counted shares.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from capworks.schema.tags import derive_tags

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PAGE_ROWS = 1000


def upgrade() -> None:
    _retag(lambda hypotheses: hypotheses)


def downgrade() -> None:
    # Equal scores weigh every hypothesis alike: the shares of before.
    _retag(lambda hypotheses: [(text, 0.0) for text, _ in hypotheses])


def _retag(scored: Callable[[list[tuple[str, float]]], Sequence[tuple[str, float]]]) -> None:
    """Recompute every caption's tags from its text, score and alternatives."""
    bind = op.get_bind()
    captions = sa.table(
        "captions",
        sa.column("id", sa.Integer),
        sa.column("text", sa.Text),
        sa.column("score", sa.Float),
        sa.column("alternatives", sa.JSON),
        sa.column("tags", sa.JSON().with_variant(JSONB(), "postgresql")),
    )
    last_id = -1
    while True:
        rows = bind.execute(
            sa.select(captions.c.id, captions.c.text, captions.c.score, captions.c.alternatives)
            .where(captions.c.id > last_id)
            .order_by(captions.c.id)
            .limit(PAGE_ROWS)
        ).all()
        if not rows:
            return
        updates = [
            {"row_id": row.id, "new_tags": dict(derive_tags(scored(_hypotheses(row))))}
            for row in rows
        ]
        bind.execute(
            captions.update()
            .where(captions.c.id == sa.bindparam("row_id"))
            .values(tags=sa.bindparam("new_tags")),
            updates,
        )
        last_id = rows[-1].id


def _hypotheses(row: Any) -> list[tuple[str, float]]:
    # An alternative stored without a score weighs like the caption (none has been seen so).
    alternatives = row.alternatives or []
    return [
        (row.text, row.score),
        *((a["text"], float(a.get("score", row.score))) for a in alternatives),
    ]

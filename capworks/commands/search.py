"""`capworks search QUERY`: captions found by words of their text, alternatives and tags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from schema.db import connect
from schema.search import Filters, Hit, search


@dataclass(frozen=True)
class SearchRequest:
    """What `capworks search` was asked."""

    db_url: str
    query: str
    filters: Filters
    limit: int
    as_json: bool


def run_search(request: SearchRequest) -> int:
    """Print the best-ranked captions as a table, or JSON lines; 0 even when none match."""
    hits = search(connect(request.db_url), request.query, request.filters, request.limit)
    if request.as_json:
        for hit in hits:
            print(json.dumps(hit.as_dict()))
        return 0
    if not hits:
        print(f"no caption matches {request.query!r}")
        return 0
    Console().print(hits_table(hits, request.query))
    return 0


def hits_table(hits: list[Hit], query: str) -> Table:
    """The hits, best first; a URI keeps its end and the caption wraps."""
    table = Table("rank", "uri", "caption", "tags", title=f"captions matching {query!r}")
    table.columns[1].overflow = "fold"
    for hit in hits:
        tags = " ".join(sorted(hit.tags, key=hit.tags.__getitem__, reverse=True)[:5])
        table.add_row(f"{hit.rank:.3g}", hit.uri, hit.caption, tags)
    return table


def as_utc(moment: datetime | None) -> datetime | None:
    """A date filter in UTC, the zone captions are stored in."""
    return moment.astimezone(UTC) if moment else None

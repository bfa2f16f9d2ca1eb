"""`capworks search QUERY`: captions found by their words (or their alternatives' and tags' with
`--in`), each hit with the fields it matched in."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from capworks.plain import plain
from capworks.schema.db import connect
from capworks.schema.search import (
    DEFAULT_FIELDS,
    MAX_RANKED,
    Field,
    Filters,
    Hit,
    SearchQueryError,
    parse_query,
    search,
)

# Words a query may hold, phrases' words included: PostgreSQL refuses a statement of ~20,000
# (StatementTooComplex), and no caption needs more than a few to be found.
MAX_QUERY_WORDS = 64


@dataclass(frozen=True)
class SearchRequest:
    """What `capworks search` was asked."""

    db_url: str
    query: str
    filters: Filters
    limit: int
    as_json: bool
    rank_all: bool = False
    fields: tuple[Field, ...] = DEFAULT_FIELDS


def run_search(request: SearchRequest) -> int:
    """Print the best-ranked captions as a table, or JSON lines; 0 even when none match."""
    check_query_size(request.query)
    max_ranked = None if request.rank_all else MAX_RANKED
    found = search(
        connect(request.db_url),
        request.query,
        request.filters,
        request.limit,
        max_ranked,
        request.fields,
    )
    if found.capped:
        print(
            f"capworks: more than {MAX_RANKED:,} captions match: these are the best of the first "
            f"{MAX_RANKED:,} (--rank-all ranks every match, slower; more words narrow it)",
            file=sys.stderr,
        )
    if request.as_json:
        for hit in found.hits:
            print(json.dumps(hit.as_dict()))
        return 0
    if not found.hits:
        print(f"no caption matches {request.query!r}")
        return 0
    Console().print(hits_table(found.hits, request.query))
    return 0


def check_query_size(query: str) -> None:
    """Raise `SearchQueryError` for a query of more than `MAX_QUERY_WORDS` words."""
    words = sum(len(term.words) for term in parse_query(query))
    if words > MAX_QUERY_WORDS:
        raise SearchQueryError(
            f"the query has {words:,} words; at most {MAX_QUERY_WORDS}: keep the telling ones"
        )


def hits_table(hits: list[Hit], query: str) -> Table:
    """The hits, best first, with the fields each matched in; a URI keeps its end and the caption
    wraps."""
    table = Table(
        "rank", "uri", "caption", "found in", "tags", title=plain(f"captions matching {query!r}")
    )
    table.columns[1].overflow = "fold"
    for hit in hits:
        tags = " ".join(sorted(hit.tags, key=hit.tags.__getitem__, reverse=True)[:5])
        table.add_row(
            f"{hit.rank:.3g}",
            plain(hit.uri),
            plain(hit.caption),
            ",".join(hit.matched),
            plain(tags),
        )
    return table


def as_utc(moment: datetime | None) -> datetime | None:
    """A date filter in UTC, the zone captions are stored in."""
    return moment.astimezone(UTC) if moment else None

"""Full-text search over captions, their alternatives and tags (migration 0005).

A query is words and "quoted phrases", each of which must match; a leading `-` excludes one
(`dog -"red ball"`). Words are stemmed (English on PostgreSQL, Porter on SQLite), so "dogs"
finds "dog". PostgreSQL ranks with `ts_rank` over the stored `captions.search` vector (caption
and tags weigh more than alternatives) through its GIN index; SQLite ranks with FTS5's `bm25`
over `captions_fts` with the same emphasis. PostgreSQL drops English stop words ("a", "on");
FTS5 keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Float, Select, column, func, literal_column, select, table, text
from sqlalchemy.orm import Session

from schema.tables import Caption, Image

# bm25 weights of the FTS5 columns (text, alternatives, tags): the same emphasis as the
# PostgreSQL vector's weights (text and tags A, alternatives C).
SQLITE_WEIGHTS = "10.0, 1.0, 10.0"
# Matches ranked at most by default: a common word's top 20 out of 10,000 matches took about
# 30 ms on 2 cores, out of 200,000 over half a second (bench/search.py).
MAX_RANKED = 10_000
_TERM = re.compile(r'(-?)"([^"]*)"?|(-?)(\S+)')


class SearchQueryError(ValueError):
    """A query with nothing to search for."""


@dataclass(frozen=True)
class Term:
    """A word or phrase of a query; `negated` terms exclude what they match."""

    words: tuple[str, ...]
    negated: bool = False


@dataclass(frozen=True)
class Filters:
    """What narrows a search besides its words."""

    prefix: str | None = None  # images whose URI starts so (s3://bucket/dir/)
    bucket: str | None = None
    model: str | None = None
    since: datetime | None = None  # captioned at or after
    until: datetime | None = None  # captioned before


@dataclass(frozen=True)
class Hit:
    """One caption found, with its rank (higher is better)."""

    uri: str
    caption: str
    rank: float
    score: float
    model: str
    revision: str
    created: datetime
    tags: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able values."""
        return {
            "uri": self.uri,
            "caption": self.caption,
            "rank": self.rank,
            "score": self.score,
            "model": self.model,
            "revision": self.revision,
            "created": self.created.isoformat(),
            "tags": self.tags,
        }


def parse_query(query: str) -> list[Term]:
    """Words and quoted phrases; raise `SearchQueryError` when no wanted term remains."""
    terms = []
    for match in _TERM.finditer(query):
        quoted_neg, phrase, word_neg, word = match.groups()
        body = phrase if phrase is not None else word
        words = tuple(w for w in re.findall(r"\w+", body))
        if words:
            terms.append(Term(words, bool(quoted_neg if phrase is not None else word_neg)))
    if not any(not t.negated for t in terms):
        raise SearchQueryError(f"nothing to search for in {query!r}: give a word to find")
    return terms


@dataclass(frozen=True)
class Found:
    """The hits of a search, and how many matches were ranked to choose them."""

    hits: list[Hit]
    ranked: int  # matches ranked (all of them unless the cap was reached)
    capped: bool  # more matches than `max_ranked`: the best of the first ones are shown


def search(
    db: Engine,
    query: str,
    filters: Filters | None = None,
    limit: int = 20,
    max_ranked: int | None = MAX_RANKED,
) -> Found:
    """The `limit` best-ranked captions matching `query` and `filters`.

    Ranking sorts every match, so a word in a fifth of a million captions costs a second; with
    `max_ranked` only the first that many matches the index yields (about the oldest rows) are
    ranked and `Found.capped` says so. None ranks every match.
    """
    terms = parse_query(query)
    if db.dialect.name == "postgresql":
        stmt = _postgres_matches(terms)
    elif db.dialect.name == "sqlite":
        stmt = _sqlite_matches(terms)
    else:
        raise SearchQueryError(f"search is not supported on {db.dialect.name}")
    stmt = _filtered(stmt, filters or Filters())
    if max_ranked is not None:
        stmt = stmt.limit(max_ranked + 1)
    matches = stmt.subquery("matches")
    best = (
        select(matches, func.count().over().label("ranked"))
        .order_by(matches.c.rank.desc(), matches.c.id)
        .limit(limit)
        .subquery("best")
    )
    # Images are joined for the hits alone, not for every match, unless a filter needs them.
    hits_query = (
        select(best, Image.uri)
        .join(Image, Image.id == best.c.image_id)
        .order_by(best.c.rank.desc(), best.c.id)
    )
    with Session(db) as session:
        rows = list(session.execute(hits_query))
    hits = [
        Hit(row.uri, row.text, float(row.rank), row.score, row.model_id, row.revision,
            row.created, dict(row.tags or {}))
        for row in rows
    ]  # fmt: skip
    total = rows[0].ranked if rows else 0
    capped = max_ranked is not None and total > max_ranked
    return Found(hits, total, capped)


def _columns() -> tuple[Any, ...]:
    return (
        Caption.image_id,
        Caption.text,
        Caption.score,
        Caption.model_id,
        Caption.revision,
        Caption.created,
        Caption.tags,
        Caption.id,
    )


def _postgres_matches(terms: list[Term]) -> Select[Any]:
    # The tsquery is a one-row subquery of immutable calls, so the planner folds it into a
    # constant and the GIN index answers `@@`.
    # It has two columns: `q` matches, `wanted` (q without its negated terms) ranks, as
    # ts_rank scores a negated term's absence as nothing.
    matching, wanted, params = [], [], {}
    for n, term in enumerate(terms):
        params[f"term{n}"] = " ".join(term.words)
        phrase = f"phraseto_tsquery('english', :term{n})"
        matching.append(f"!!{phrase}" if term.negated else phrase)
        if not term.negated:
            wanted.append(phrase)
    tsquery = (
        text(f"SELECT {' && '.join(matching)} AS q, {' && '.join(wanted)} AS wanted")
        .bindparams(**params)
        .columns(column("q"), column("wanted"))
        .subquery("query")
    )
    vector = literal_column("captions.search", Float)
    rank = literal_column("ts_rank(captions.search, query.wanted)", Float).label("rank")
    return (
        select(*_columns(), rank).select_from(Caption).join(tsquery, vector.op("@@")(tsquery.c.q))
    )


def _sqlite_matches(terms: list[Term]) -> Select[Any]:
    fts = table("captions_fts", column("rowid"))
    wanted = " AND ".join(_fts_phrase(t) for t in terms if not t.negated)
    unwanted = "".join(f" NOT {_fts_phrase(t)}" for t in terms if t.negated)
    # bm25 is lower for better matches; negated it reads like PostgreSQL's rank.
    rank = literal_column(f"-bm25(captions_fts, {SQLITE_WEIGHTS})", Float).label("rank")
    return (
        select(*_columns(), rank)
        .select_from(fts)
        .join(Caption, Caption.id == fts.c.rowid)
        .where(text("captions_fts MATCH :match").bindparams(match=wanted + unwanted))
    )


def _fts_phrase(term: Term) -> str:
    # Words are \w+ runs, so they hold no quote; quoting keeps AND/OR/NOT/NEAR literal.
    return '"' + " ".join(term.words) + '"'


def _filtered(stmt: Select[Any], filters: Filters) -> Select[Any]:
    if filters.prefix or filters.bucket:
        stmt = stmt.join(Image, Image.id == Caption.image_id)
    if filters.prefix:
        stmt = stmt.where(Image.uri.startswith(filters.prefix, autoescape=True))
    if filters.bucket:
        stmt = stmt.where(Image.bucket == filters.bucket)
    if filters.model:
        stmt = stmt.where(Caption.model_id == filters.model)
    if filters.since:
        stmt = stmt.where(Caption.created >= filters.since)
    if filters.until:
        stmt = stmt.where(Caption.created < filters.until)
    return stmt

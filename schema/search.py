"""Full-text search over captions, their alternatives and tags (migration 0005).

A query is words and "quoted phrases", each of which must match; a leading `-` excludes one
(`dog -"red ball"`). Words are stemmed (English on PostgreSQL, Porter on SQLite), so "dogs"
finds "dog". A search looks in the fields it is given (`caption` alone by default; the beam
alternatives and tags are words the model rejected or shares with them, so an image is not
about them), and an exclusion applies to those same fields only.

Rank: an image whose caption matches every wanted term ranks 1 + s, any other match s, where
s in [0, 1) is the text score over the searched fields (the caption weighing ten times an
alternative or tag): a caption match always outranks a match through alternatives or tags.
PostgreSQL finds candidates with the stored `captions.search` vector's GIN index and checks
them against the searched fields; SQLite matches FTS5 column filters over `captions_fts`.
PostgreSQL drops English stop words ("a", "on"); FTS5 keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    Engine,
    Float,
    Select,
    case,
    column,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.orm import Session

from capworks.schema.tables import Caption, Image

Field = Literal["caption", "alternatives", "tags"]
FIELDS: tuple[Field, ...] = get_args(Field)
DEFAULT_FIELDS: tuple[Field, ...] = ("caption",)
# Text-score weight of each field: the caption far above the words the beam rejected.
FIELD_WEIGHTS: dict[Field, float] = {"caption": 1.0, "alternatives": 0.1, "tags": 0.1}
# Matches ranked at most by default: a common word's top 20 out of 10,000 matches took about
# 30 ms on 2 cores, out of 200,000 over half a second (bench/search.py).
MAX_RANKED = 10_000
_TERM = re.compile(r'(-?)"([^"]*)"?|(-?)(\S+)')
# The SQL of each field: FTS5 column of captions_fts, and the tsvector of a captions row.
_FTS_COLUMN: dict[Field, str] = {"caption": "text", "alternatives": "alternatives", "tags": "tags"}
_PG_VECTOR: dict[Field, str] = {
    "caption": "to_tsvector('english'::regconfig, captions.text)",
    "alternatives": (
        "json_to_tsvector('english'::regconfig, captions.alternatives, '[\"string\"]')"
    ),
    "tags": "jsonb_to_tsvector('english'::regconfig, captions.tags, '[\"key\"]')",
}
_PG_LABEL: dict[Field, str] = {"caption": "A", "tags": "B", "alternatives": "C"}


class SearchQueryError(ValueError):
    """A query with nothing to search for, or fields that do not exist."""


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
    """One caption found, with its rank (higher is better) and the searched fields holding a
    wanted term (`matched`): what made it a match."""

    uri: str
    caption: str
    rank: float
    score: float
    model: str
    revision: str
    created: datetime
    tags: dict[str, float]
    matched: tuple[Field, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-able values."""
        return {
            "uri": self.uri,
            "caption": self.caption,
            "rank": self.rank,
            "matched": list(self.matched),
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


def parse_fields(spec: str) -> tuple[Field, ...]:
    """`caption,tags` as fields in their canonical order; `SearchQueryError` names a bad one."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIELDS]
    if unknown or not names:
        raise SearchQueryError(
            f"cannot search in {spec!r}: choose from {','.join(FIELDS)} (comma-separated)"
        )
    return tuple(field for field in FIELDS if field in names)


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
    fields: Sequence[Field] = DEFAULT_FIELDS,
) -> Found:
    """The `limit` best-ranked captions whose `fields` match `query`, within `filters`.

    Ranking sorts every match, so a word in a fifth of a million captions costs a second; with
    `max_ranked` only the first that many matches the index yields (about the oldest rows) are
    ranked and `Found.capped` says so. None ranks every match.
    """
    terms = parse_query(query)
    chosen = tuple(field for field in FIELDS if field in fields)
    if not chosen:
        raise SearchQueryError("no field to search in: choose from " + ",".join(FIELDS))
    if db.dialect.name == "postgresql":
        stmt = _postgres_matches(terms, chosen)
    elif db.dialect.name == "sqlite":
        stmt = _sqlite_matches(terms, chosen)
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
        matched = _matched_fields(session, terms, chosen, [row.id for row in rows])
    hits = [
        Hit(row.uri, row.text, float(row.rank), row.score, row.model_id, row.revision,
            row.created, dict(row.tags or {}), matched.get(row.id, ()))
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


def _pg_tsquery(terms: list[Term], negated: bool = True, joiner: str = " && ") -> str:
    """The tsquery SQL of `terms` (bind parameters :term0...), negated ones kept or left out."""
    parts = []
    for n, term in enumerate(terms):
        phrase = f"phraseto_tsquery('english', :term{n})"
        if not term.negated:
            parts.append(phrase)
        elif negated:
            parts.append(f"!!{phrase}")
    return joiner.join(parts)


def _pg_params(terms: list[Term]) -> dict[str, str]:
    return {f"term{n}": " ".join(term.words) for n, term in enumerate(terms)}


def _pg_document(fields: Sequence[Field]) -> str:
    return " || ".join(f"setweight({_PG_VECTOR[f]}, '{_PG_LABEL[f]}')" for f in fields)


def _postgres_matches(terms: list[Term], fields: tuple[Field, ...]) -> Select[Any]:
    # The tsquery is a one-row subquery of immutable calls, so the planner folds it into a
    # constant and the GIN index answers `@@`: `wanted` (the query without its exclusions)
    # over the stored vector of all fields finds candidates, `q` over the searched fields
    # decides. ts_rank scores a negated term's absence as nothing, so `wanted` ranks.
    tsquery = (
        text(f"SELECT {_pg_tsquery(terms)} AS q, {_pg_tsquery(terms, negated=False)} AS wanted")
        .bindparams(**_pg_params(terms))
        .columns(column("q"), column("wanted"))
        .subquery("query")
    )
    document = _pg_document(fields)
    # ts_rank's weights are {D, C, B, A}; normalisation 32 maps a score s to s / (s + 1).
    alt, tag, cap = (FIELD_WEIGHTS[f] for f in ("alternatives", "tags", "caption"))
    weights = f"{{0, {alt}, {tag}, {cap}}}"
    tier = (
        f"CASE WHEN {_PG_VECTOR['caption']} @@ query.wanted THEN 1 ELSE 0 END"
        if "caption" in fields
        else "0"
    )
    rank = literal_column(
        f"{tier} + ts_rank('{weights}', {document}, query.wanted, 32)", Float
    ).label("rank")
    candidates = literal_column("captions.search", Float).op("@@")(tsquery.c.wanted)
    decides = literal_column(f"({document})", Float).op("@@")(tsquery.c.q)
    return select(*_columns(), rank).select_from(Caption).join(tsquery, candidates).where(decides)


def _fts_match(terms: list[Term], fields: Sequence[Field], negated: bool = True) -> str:
    """An FTS5 MATCH string for `terms` within the columns of `fields`."""
    wanted = " AND ".join(_fts_phrase(t) for t in terms if not t.negated)
    unwanted = "".join(f" NOT {_fts_phrase(t)}" for t in terms if t.negated) if negated else ""
    columns = " ".join(_FTS_COLUMN[f] for f in fields)
    return f"{{{columns}}} : ({wanted}{unwanted})"


def _sqlite_matches(terms: list[Term], fields: tuple[Field, ...]) -> Select[Any]:
    fts = table("captions_fts", column("rowid"))
    # bm25 is lower for better matches; negated it reads like PostgreSQL's rank. A field not
    # searched weighs nothing.
    weights = ", ".join(str(FIELD_WEIGHTS[f] * 10 if f in fields else 0.0) for f in FIELDS)
    score = f"-bm25(captions_fts, {weights})"
    tier: Any = literal(0)
    if "caption" in fields:
        # The table-valued form of MATCH: an inner `captions_fts MATCH` would be the outer row's.
        in_caption: Select[Any] = select(column("rowid")).select_from(
            text("captions_fts(:caption_match)").bindparams(
                caption_match=_fts_match(terms, ("caption",), negated=False)
            )
        )
        tier = case((Caption.id.in_(in_caption.scalar_subquery()), 1), else_=0)
    rank = (tier + literal_column(f"({score}) / (1 + {score})", Float)).label("rank")
    return (
        select(*_columns(), rank)
        .select_from(fts)
        .join(Caption, Caption.id == fts.c.rowid)
        .where(text("captions_fts MATCH :match").bindparams(match=_fts_match(terms, fields)))
    )


def _fts_phrase(term: Term) -> str:
    # Words are \w+ runs, so they hold no quote; quoting keeps AND/OR/NOT/NEAR literal.
    return '"' + " ".join(term.words) + '"'


def _matched_fields(
    session: Session, terms: list[Term], fields: tuple[Field, ...], ids: list[int]
) -> dict[int, tuple[Field, ...]]:
    """For each caption id, the searched fields holding at least one wanted term."""
    if not ids:
        return {}
    wanted = [t for t in terms if not t.negated]
    found: dict[int, list[Field]] = {caption_id: [] for caption_id in ids}
    for field in fields:
        if session.get_bind().dialect.name == "postgresql":
            stmt = text(
                f"SELECT id FROM captions WHERE id = ANY(:ids) AND "  # noqa: S608 - SQL from this module's constants
                f"{_PG_VECTOR[field]} @@ ({_pg_tsquery(wanted, joiner=' || ')})"
            ).bindparams(ids=ids, **_pg_params(wanted))
        else:
            any_term = " OR ".join(_fts_phrase(t) for t in wanted)
            match = f"{{{_FTS_COLUMN[field]}}} : ({any_term})"
            marks = ", ".join(str(int(i)) for i in ids)
            stmt = text(
                f"SELECT rowid AS id FROM captions_fts WHERE captions_fts MATCH :match "  # noqa: S608 - ids are ints
                f"AND rowid IN ({marks})"
            ).bindparams(match=match)
        for (caption_id,) in session.execute(stmt):
            found[caption_id].append(field)
    return {caption_id: tuple(names) for caption_id, names in found.items()}


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

"""Which of two announcements of one object names the newer version: the order the sink keeps.

An object is captioned at its latest version, so the sink remembers, per object and model, the
version it last published and judges each new announcement against it:

- S3's `sequencer` orders the events of one key: left-pad both to one length, compare as text
  (hex digits, any case).
- Without sequencers on both sides the event time orders them (the S3 `eventTime`, the filer's
  `tsNs`), in nanoseconds.
- At one position in that order, or with no order to compare, the same content (ETag and version
  id) is the same version; anything else is taken as newer, so an overwrite is never dropped on
  the key alone.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

from capworks.producer.events.records import ObjectCreated


class Order(enum.Enum):
    """Where an announced version stands against the latest one published."""

    OLDER = "older"  # superseded: the object no longer holds it
    SAME = "same"  # a repeat of the latest: a duplicate
    NEWER = "newer"  # to be captioned


@dataclass(frozen=True)
class Version:
    """What places one announcement of an object: its order and its content."""

    sequencer: str | None = None
    event_ns: int | None = None
    etag: str | None = None
    version_id: str | None = None

    @classmethod
    def of(cls, event: ObjectCreated) -> Version:
        """The version an event announces."""
        return cls(event.sequencer, event.event_ns, event.etag, event.version_id)

    def to_json(self) -> str:
        """The stored form (kept in Redis as the object's latest version)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Version | None:
        """A stored version; None for anything else (a mark of an older release, garbage)."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        texts = [doc.get(name) for name in ("sequencer", "etag", "version_id")]
        event_ns = doc.get("event_ns")
        if any(t is not None and not isinstance(t, str) for t in texts) or (
            event_ns is not None and (not isinstance(event_ns, int) or isinstance(event_ns, bool))
        ):
            return None
        sequencer, etag, version_id = texts
        return cls(sequencer, event_ns, etag, version_id)


def compare_versions(event: Version, latest: Version) -> Order:
    """Where `event` stands against `latest`, the version last published for the same object."""
    order = _order(event, latest)
    if order:
        return Order.NEWER if order > 0 else Order.OLDER
    return Order.SAME if _same_content(event, latest, ordered=order == 0) else Order.NEWER


def _order(event: Version, latest: Version) -> int | None:
    """1, 0 or -1 as `event` comes after, with or before `latest`; None if nothing orders them."""
    if event.sequencer is not None and latest.sequencer is not None:
        width = max(len(event.sequencer), len(latest.sequencer))
        ours, theirs = event.sequencer.upper().zfill(width), latest.sequencer.upper().zfill(width)
        return (ours > theirs) - (ours < theirs)
    if event.event_ns is not None and latest.event_ns is not None:
        return (event.event_ns > latest.event_ns) - (event.event_ns < latest.event_ns)
    return None


def _same_content(event: Version, latest: Version, ordered: bool) -> bool:
    same = (event.etag, event.version_id) == (latest.etag, latest.version_id)
    # Unordered announcements that name no content could be any two uploads.
    return same and (ordered or event.etag is not None or event.version_id is not None)

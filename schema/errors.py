"""The error taxonomy: every failure has a kind (transient or permanent) and a short code."""

from __future__ import annotations

import enum
from typing import Any


class Kind(enum.Enum):
    """Transient failures are retried with backoff; permanent ones are dead-lettered at once."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Code(enum.Enum):
    """Machine-readable failure codes stored with every dead letter."""

    EMPTY = "empty"
    UNDECODABLE = "undecodable"
    TRUNCATED = "truncated"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_LARGE_BYTES = "too_large_bytes"
    TOO_LARGE_PIXELS = "too_large_pixels"
    TOO_MANY_SCANS = "too_many_scans"  # a JPEG whose scans would cost a decoder pass each
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    BAD_URI = "bad_uri"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    MALFORMED_MESSAGE = "malformed_message"
    POISON = "poison"
    RETRIES_EXHAUSTED = "retries_exhausted"
    INTERNAL_ERROR = "internal_error"
    MODEL_ERROR = "model_error"
    WRONG_MODEL = "wrong_model"
    FORBIDDEN_ADDRESS = "forbidden_address"  # an http(s) fetch the guard refuses (workers/guard.py)
    FORBIDDEN_PATH = "forbidden_path"  # a local file outside the configured roots
    TOO_MANY_REDIRECTS = "too_many_redirects"


TRANSIENT_CODES = frozenset(
    {Code.STORAGE_UNAVAILABLE, Code.DATABASE_UNAVAILABLE, Code.OUT_OF_MEMORY}
)


class CapworksError(Exception):
    """A failure with a code and a human-readable reason."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @property
    def kind(self) -> Kind:
        """Whether retrying can help."""
        return Kind.TRANSIENT if self.code in TRANSIENT_CODES else Kind.PERMANENT

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (a listing process sends its error to the crawl), whatever arguments
        # a subclass's own __init__ takes.
        return (_rebuilt, (type(self), self.code, self.message))


def _rebuilt(cls: type[CapworksError], code: Code, message: str) -> CapworksError:
    error = cls.__new__(cls)
    CapworksError.__init__(error, code, message)
    return error


class Unreachable(CapworksError):
    """A service (broker, database) refused or dropped the connection: it may be restarting,
    so a process starting up waits for it (`capworks.schema.startup.wait_until_reachable`)."""

    def __str__(self) -> str:
        # "cannot reach the broker at ...": the code (`storage_unavailable`) names an image's
        # store to a user, not the service the command could not reach
        return self.message


class ImageError(CapworksError):
    """One image could not be used; the rest of its batch goes on."""


class StorageError(CapworksError):
    """Fetching from or listing a store failed."""


class CheckpointError(Exception):
    """A model checkpoint could not be found or loaded."""

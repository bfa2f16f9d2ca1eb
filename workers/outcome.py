"""The one per-item result type of the image path: `Outcome(ref, result)`, where the result is the
stage's value or the `CapworksError` that stopped the image (img2dataset's `(key, value, error)`).

Every stage maps outcomes to outcomes, and a failed image keeps its failure through the stages
after it, so no stage juggles slot indices to put failures back in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from capworks.schema.errors import CapworksError
from capworks.schema.uris import ImageRef

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What happened to one image so far: a value, or a failure with a code and a reason."""

    ref: ImageRef
    result: T | CapworksError

    @property
    def error(self) -> CapworksError | None:
        """The failure, or None when the image is still good."""
        return self.result if isinstance(self.result, CapworksError) else None


def map_good(
    outcomes: Sequence[Outcome[T]], step: Callable[[list[T]], Sequence[U | CapworksError]]
) -> list[Outcome[U]]:
    """Run a batch step over the good values only; failures keep their place and their error.
    The step must return exactly one result per value it was given (LitServe's hard check)."""
    good = [o.result for o in outcomes if o.error is None]
    results = list(step(good))  # type: ignore[arg-type]
    if len(results) != len(good):
        raise RuntimeError(f"a batch step returned {len(results)} results for {len(good)} inputs")
    done = iter(results)
    return [Outcome(o.ref, o.error if o.error is not None else next(done)) for o in outcomes]

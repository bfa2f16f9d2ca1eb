"""Generators: the seam where beam-search implementations plug into the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from capworks.schema.checkpoint import GenerationSettings


@dataclass(frozen=True)
class Hypothesis:
    """One finished beam: its tokens (ending with EOS) and its length-normalised score."""

    tokens: tuple[int, ...]
    score: float


class Generator(Protocol):
    """Turns a batch of prompts and images into finished hypotheses, best first, per image."""

    name: str

    def generate(
        self, input_ids: torch.Tensor, patch_images: torch.Tensor
    ) -> list[list[Hypothesis]]:
        """Hypotheses per image, sorted by score, best first."""
        ...


GENERATORS = ("reference", "fast")


def make_generator(
    name: str,
    model: Any,
    tokenizer: Any,
    settings: GenerationSettings,
    autocast_dtype: torch.dtype | None = None,
) -> Generator:
    """Build the generator called `name` for a loaded model (autocast applies to `fast` only)."""
    if name == "reference":
        from capworks.workers.generators.reference import ReferenceGenerator

        return ReferenceGenerator(model, tokenizer, settings)
    if name == "fast":
        from capworks.workers.generators.fast import FastGenerator

        return FastGenerator(model, tokenizer, settings, autocast_dtype)
    raise ValueError(f"unknown generator {name!r}; use one of {', '.join(GENERATORS)}")

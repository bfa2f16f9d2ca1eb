"""ModelScope's own `SequenceGenerator` on `OFAModel`: the reference for what to compute."""

from __future__ import annotations

from typing import Any

import torch

from capworks.schema.checkpoint import GenerationSettings
from capworks.workers.generators import Hypothesis


class ReferenceGenerator:
    """Calls ModelScope's OFA sequence generator exactly as `OfaForAllTasks` configures it."""

    name = "reference"

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings) -> None:
        from modelscope.models.multi_modal.ofa.generate import sequence_generator

        self._model = model
        self._generator = sequence_generator.SequenceGenerator(
            tokenizer=tokenizer, constraint_range=None, **settings.to_dict()
        )

    def generate(
        self, input_ids: torch.Tensor, patch_images: torch.Tensor
    ) -> list[list[Hypothesis]]:
        """Hypotheses per image, best first, as ModelScope's generator returns them."""
        patch_masks = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        sample = {
            "net_input": {
                "input_ids": input_ids,
                "patch_images": patch_images,
                "patch_masks": patch_masks,
            }
        }
        with torch.no_grad():
            finalized = self._generator.generate([self._model], sample)
        return [
            [
                Hypothesis(tuple(int(t) for t in h["tokens"].tolist()), float(h["score"]))
                for h in hyps
            ]
            for hyps in finalized
        ]

"""OfaEngine: images in, captions out, in batches, with per-image failures.

The lifecycle is LitServe's: `load` (once per process, on a device), `preprocess` (decode and
resize in threads), `predict` (one batch through a generator), `decode` (tokens to text).
`caption_pixels` is what the batcher calls; `caption_images` is the raw engine on encoded
images (benchmarks and tests compare the image path against it).
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from capworks.schema.checkpoint import CheckpointConfig
from capworks.schema.errors import ImageError
from capworks.schema.settings import Settings
from capworks.schema.tags import derive_tags
from capworks.schema.uris import ImageRef
from capworks.workers.generators import Generator, Hypothesis, make_generator
from capworks.workers.ofa_model import (
    encode_prompt,
    load_model,
    load_tokenizer,
    pick_device,
    pick_precision,
)
from capworks.workers.outcome import Outcome, map_good
from capworks.workers.preprocess import (
    ExactDecoder,
    ImageLimits,
    Normalization,
    PreparedImage,
    host_pixels,
    preprocess_many,
)

log = logging.getLogger(__name__)
DEFAULT_LIMITS = ImageLimits()
_PUNCTUATION = str.maketrans({c: None for c in string.punctuation})


@dataclass(frozen=True)
class Alternative:
    """A lower-ranked beam hypothesis."""

    text: str
    score: float


@dataclass(frozen=True)
class Caption:
    """The best caption of one image, its score, the other beam hypotheses, and the tags they
    agree on (lemma, share of hypotheses containing it), best first."""

    text: str
    score: float
    alternatives: tuple[Alternative, ...]
    tokens: tuple[int, ...]
    tags: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class CaptionedImage:
    """A caption with the dimensions of the image it describes."""

    caption: Caption
    width_px: int
    height_px: int


class OfaEngine:
    """A loaded OFA captioner on one device."""

    def __init__(
        self,
        config: CheckpointConfig,
        model: Any,
        tokenizer: Any,
        generator: Generator,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 8,
        limits: ImageLimits = DEFAULT_LIMITS,
        decode_threads: int = 0,
        jpeg_draft: bool = False,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.generator = generator
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.limits = limits
        self.prompt_ids = encode_prompt(tokenizer, config.prompt, config.max_src_length)
        self.normalization = Normalization(config.patch_image_size, *config.mean_std)
        self.decoder = ExactDecoder(limits, self.normalization, jpeg_draft)
        self._pool = ThreadPoolExecutor(decode_threads or os.cpu_count() or 1, "capworks-decode")

    @classmethod
    def load(
        cls,
        config: CheckpointConfig,
        *,
        device: str = "auto",
        dtype: str = "auto",
        generator: str = "fast",
        batch_size: int = 8,
        limits: ImageLimits = DEFAULT_LIMITS,
        decode_threads: int = 0,
        jpeg_draft: bool = False,
    ) -> OfaEngine:
        """Load model and tokenizer from a resolved checkpoint onto a device."""
        dev = pick_device(device)
        weights, autocast = pick_precision(dtype, dev, generator)
        tokenizer = load_tokenizer(config.model_dir)
        model = load_model(config, dev, weights)
        gen = make_generator(generator, model, tokenizer, config.generation, autocast)
        dt = weights
        log.info("loaded %s on %s (%s, generator %s)", config.model_id, dev, dt, gen.name)
        return cls(
            config, model, tokenizer, gen, dev, dt, batch_size, limits, decode_threads, jpeg_draft
        )

    @classmethod
    def from_settings(cls, config: CheckpointConfig, settings: Settings) -> OfaEngine:
        """Load with the device, precision, generator, batch and limits that settings give."""
        return cls.load(
            config,
            device=settings.device,
            dtype=settings.dtype,
            generator=settings.generator,
            batch_size=settings.batch_size,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_px),
            decode_threads=settings.decode_threads,
            jpeg_draft=settings.jpeg_draft,
        )

    def close(self) -> None:
        """Stop the preprocessing threads."""
        self._pool.shutdown(wait=False)

    def preprocess(self, blobs: Sequence[bytes]) -> list[PreparedImage | ImageError]:
        """Decode, validate and resize encoded images in the thread pool."""
        return preprocess_many(blobs, self.decoder, self._pool)

    def predict(self, pixels: Sequence[np.ndarray | torch.Tensor]) -> list[list[Hypothesis]]:
        """Run one batch of preprocessed images (host arrays, or tensors device preprocessing
        left on the device) through the generator."""
        if not pixels:
            return []
        host = [p for p in pixels if isinstance(p, np.ndarray)]
        if len(host) == len(pixels):
            images = torch.from_numpy(np.stack(host))
            if self.device.type == "cuda":
                # Page-locked host memory lets the copy run asynchronously to the GPU's queue.
                images = images.pin_memory().to(self.device, self.dtype, non_blocking=True)
            else:
                images = images.to(self.dtype)
        else:
            on_device = [torch.as_tensor(p, device=self.device) for p in pixels]
            images = torch.stack(on_device).to(self.dtype)
        prompt = torch.tensor([self.prompt_ids], dtype=torch.long, device=self.device)
        hyps = self.generator.generate(prompt.expand(len(pixels), -1), images)
        if len(hyps) != len(pixels):
            raise RuntimeError(f"generator returned {len(hyps)} results for {len(pixels)} images")
        return hyps

    def decode(self, hyps: Sequence[Hypothesis]) -> Caption:
        """Tokens to text exactly as ModelScope's captioning pipeline does it."""
        texts = self.tokenizer.batch_decode(
            [list(h.tokens) for h in hyps],
            skip_special_tokens=True,
            # Pinned: the default changed in transformers 4.45 and hub checkpoints ship no
            # tokenizer_config.json; True is what the published OFA captions were made with.
            clean_up_tokenization_spaces=True,
        )
        texts = [t.strip() for t in texts]
        if self.config.language == "en":
            texts = [t.translate(_PUNCTUATION).strip() for t in texts]
        alternatives = tuple(
            Alternative(t, h.score) for t, h in zip(texts[1:], hyps[1:], strict=True)
        )
        tags = tuple(derive_tags([(t, h.score) for t, h in zip(texts, hyps, strict=True)]))
        return Caption(texts[0], hyps[0].score, alternatives, hyps[0].tokens, tags)

    def caption_pixels(self, pixels: Sequence[np.ndarray | torch.Tensor]) -> list[Caption]:
        """Caption preprocessed images, `batch_size` at a time."""
        out: list[Caption] = []
        for start in range(0, len(pixels), self.batch_size):
            out.extend(
                self.decode(h) for h in self.predict(pixels[start : start + self.batch_size])
            )
        return out

    def caption_images(self, blobs: Sequence[bytes]) -> list[CaptionedImage | ImageError]:
        """Caption encoded images; a bad image stays in its slot as an `ImageError`."""
        decoded = [Outcome(ImageRef(str(i)), p) for i, p in enumerate(self.preprocess(blobs))]
        captioned = map_good(decoded, self._caption_prepared)
        return [o.result for o in captioned]  # type: ignore[misc]

    def _caption_prepared(self, prepared: list[PreparedImage]) -> list[CaptionedImage]:
        captions = self.caption_pixels([host_pixels(p) for p in prepared])
        return [
            CaptionedImage(c, p.width_px, p.height_px)
            for c, p in zip(captions, prepared, strict=True)
        ]

"""The fast generator returns exactly what ModelScope's reference generator returns: the same
hypotheses (tokens) in the same order, scores equal to 1e-4, whatever the batch; and its tensor
n-gram blocker bans exactly what the reference blocker bans."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from capworks.schema.checkpoint import CheckpointConfig, GenerationSettings, read_config
from capworks.workers.engine import OfaEngine
from capworks.workers.generators import Hypothesis, make_generator
from capworks.workers.generators.fast import FastGenerator
from capworks.workers.generators.ngram import ban_repeated_ngrams
from capworks.workers.generators.reference import ReferenceGenerator
from capworks.workers.ofa_model import encode_prompt, load_model, load_tokenizer

SCORE_TOLERANCE = 1e-4
SMALL_PX = 64  # OFA takes any multiple of 16; the reference is slow at 480 px on a CPU
EOS = 2
# Random weights almost never choose EOS before max_len, so sentences would all finish at the
# last step. Scaling EOS's row of the output projection makes hypotheses end at many different
# steps, which exercises finalising, dropping finished sentences and reordering the caches.
EOS_BOOST = 6.0

SETTINGS = {
    "defaults": GenerationSettings(),
    "short-beams-bigram": GenerationSettings(
        beam_size=3,
        min_len=4,
        len_penalty=0.6,
        temperature=0.8,
        unk_penalty=-1.0,
        no_repeat_ngram_size=2,
    ),
    "unnormalised-no-blocking": GenerationSettings(
        beam_size=4, no_repeat_ngram_size=0, normalize_scores=False, max_len_b=10, len_penalty=2.0
    ),
    "unigram-blocking": GenerationSettings(beam_size=2, no_repeat_ngram_size=1, max_len_b=6),
    "source-length-4gram": GenerationSettings(no_repeat_ngram_size=4, max_len_a=0.5, max_len_b=6),
    "greedy": GenerationSettings(beam_size=1, max_len_b=8),
}


@dataclass
class Loaded:
    """A model on the CPU with what generation needs."""

    config: CheckpointConfig
    model: Any
    tokenizer: Any
    prompt: list[int]


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Loaded:
    config = read_config(tiny_dir, "tiny-random")
    tokenizer = load_tokenizer(config.model_dir)
    model = load_model(config, torch.device("cpu"), torch.float32)
    return Loaded(
        config, model, tokenizer, encode_prompt(tokenizer, config.prompt, config.max_src_length)
    )


@pytest.fixture(scope="module")
def tiny_eos(tiny: Loaded) -> Loaded:
    # A fresh load, not a deep copy: the copy would untie the output projection from the
    # embeddings, and it is the output projection's EOS row that must change.
    model = load_model(tiny.config, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model.decoder.output_projection.weight[EOS] *= EOS_BOOST
    return Loaded(tiny.config, model, tiny.tokenizer, tiny.prompt)


@pytest.fixture(scope="module")
def shapes(shapes_dir: Path) -> Loaded:
    config = read_config(shapes_dir, "shapes")
    tokenizer = load_tokenizer(config.model_dir)
    model = load_model(config, torch.device("cpu"), torch.float32)
    return Loaded(
        config, model, tokenizer, encode_prompt(tokenizer, config.prompt, config.max_src_length)
    )


def random_images(count: int, size_px: int, seed: int) -> torch.Tensor:
    """Noise images of very different contrast, so that captions differ between images."""
    noise = torch.randn(count, 3, size_px, size_px, generator=torch.Generator().manual_seed(seed))
    return noise * torch.linspace(0.2, 4.0, count)[:, None, None, None]


def prompts(loaded: Loaded, count: int) -> torch.Tensor:
    return torch.tensor([loaded.prompt], dtype=torch.long).expand(count, -1)


def run_both(
    loaded: Loaded, settings: GenerationSettings, images: torch.Tensor
) -> tuple[list[list[Hypothesis]], list[list[Hypothesis]]]:
    ids = prompts(loaded, images.shape[0])
    fast = FastGenerator(loaded.model, loaded.tokenizer, settings).generate(ids, images)
    ref = ReferenceGenerator(loaded.model, loaded.tokenizer, settings).generate(ids, images)
    return fast, ref


def assert_same_hypotheses(got: list[list[Hypothesis]], want: list[list[Hypothesis]]) -> None:
    assert len(got) == len(want)
    for image, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [h.tokens for h in g] == [h.tokens for h in w], f"image {image}"
        for rank, (hg, hw) in enumerate(zip(g, w, strict=True)):
            assert math.isclose(hg.score, hw.score, rel_tol=0, abs_tol=SCORE_TOLERANCE), (
                f"image {image} hypothesis {rank}: {hg.score} != {hw.score}"
            )


def test_make_generator_builds_the_fast_generator(tiny: Loaded) -> None:
    gen = make_generator("fast", tiny.model, tiny.tokenizer, tiny.config.generation)
    assert isinstance(gen, FastGenerator) and gen.name == "fast"


def test_fast_generator_matches_reference_tokens_and_scores_on_tiny_random_at_480_px(
    tiny: Loaded,
) -> None:
    rng = np.random.default_rng(480)
    pixels = [rng.standard_normal((3, 480, 480), dtype=np.float32)]
    engines = [
        OfaEngine(
            tiny.config,
            tiny.model,
            tiny.tokenizer,
            make_generator(name, tiny.model, tiny.tokenizer, tiny.config.generation),
            torch.device("cpu"),
            torch.float32,
        )
        for name in ("fast", "reference")
    ]
    try:
        fast, ref = (engine.predict(pixels) for engine in engines)
    finally:
        for engine in engines:
            engine.close()
    assert all(len(hyps) == tiny.config.generation.beam_size for hyps in ref)
    assert_same_hypotheses(fast, ref)


# Without the EOS boost every hypothesis runs to max_len, which is slow for the reference:
# all settings at batch 1, the defaults at batch 8.
@pytest.mark.parametrize(("name", "batch"), [(name, 1) for name in SETTINGS] + [("defaults", 8)])
def test_fast_generator_matches_reference_tokens_and_scores_on_tiny_random(
    tiny: Loaded, name: str, batch: int
) -> None:
    fast, ref = run_both(tiny, SETTINGS[name], random_images(batch, SMALL_PX, seed=batch))
    assert_same_hypotheses(fast, ref)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("batch", [1, 8])
def test_fast_generator_matches_reference_when_hypotheses_end_at_different_steps(
    tiny_eos: Loaded, name: str, batch: int
) -> None:
    fast, ref = run_both(tiny_eos, SETTINGS[name], random_images(batch, SMALL_PX, seed=10 + batch))
    assert_same_hypotheses(fast, ref)
    if name == "defaults" and batch == 8:
        lengths = {len(h.tokens) for hyps in ref for h in hyps}
        assert len(lengths) > 3  # the case really has early endings


@pytest.mark.parametrize("eos_boosted", [False, True])
def test_fast_generator_matches_reference_on_a_batch_of_32(
    tiny: Loaded, tiny_eos: Loaded, eos_boosted: bool
) -> None:
    loaded = tiny_eos if eos_boosted else tiny
    settings = GenerationSettings() if eos_boosted else GenerationSettings(max_len_b=6)
    fast, ref = run_both(loaded, settings, random_images(32, 32, seed=32))
    assert_same_hypotheses(fast, ref)


def test_fast_captions_do_not_depend_on_the_batch_an_image_lands_in(tiny_eos: Loaded) -> None:
    images = random_images(12, SMALL_PX, seed=7)
    gen = FastGenerator(tiny_eos.model, tiny_eos.tokenizer, GenerationSettings())
    alone = {i: gen.generate(prompts(tiny_eos, 1), images[i : i + 1])[0] for i in (0, 3)}
    batches = [
        [5, 0, 3],
        [3, 6, 7, 8, 9, 10, 11, 1, 2, 4, 5, 0],
        random.Random(32).choices(range(4, 12), k=30) + [0, 3],
    ]
    for order in batches:
        random.Random(len(order)).shuffle(order)
        out = gen.generate(prompts(tiny_eos, len(order)), images[order])
        for image in (0, 3):
            assert_same_hypotheses([out[order.index(image)]], [alone[image]])


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_fast_generator_matches_reference_on_the_shapes_checkpoint(
    shapes: Loaded, batch: int
) -> None:
    from capworks.checkpoints.shapes_world import sample_scenes
    from capworks.workers.preprocess import Normalization, to_pixels

    norm = Normalization(shapes.config.patch_image_size, *shapes.config.mean_std)
    images = torch.from_numpy(
        np.stack([to_pixels(img, norm) for img, _ in sample_scenes(batch, 100 + batch)])
    )
    fast, ref = run_both(shapes, shapes.config.generation, images)
    assert_same_hypotheses(fast, ref)


def reference_blocker(n: int) -> Any:
    from modelscope.models.multi_modal.ofa.generate.ngram_repeat_block import NGramRepeatBlock

    return NGramRepeatBlock(n, use_extension=False)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tensor_ngram_blocker_bans_what_the_reference_blocker_bans(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    pad, vocab, beam, bsz, width = 1, 12, 3, 4, 14
    blocker = reference_blocker(n)
    for step in range(width - 1):
        # Buffers as the generator keeps them: BOS, then `step` tokens from a small vocabulary
        # (so that n-grams repeat often), then PAD up to the end.
        tokens = torch.full((bsz * beam, width), pad, dtype=torch.long)
        tokens[:, 0] = 0
        body = torch.randint(2, 6, (bsz * beam, step), generator=gen)
        tokens[:, 1 : step + 1] = body
        lprobs = torch.randn(bsz * beam, vocab, generator=gen).log_softmax(-1)
        lprobs[:, pad] = -math.inf  # the generator bans PAD before blocking
        want = blocker._no_repeat_ngram(tokens, lprobs.clone(), bsz, beam, step)
        got = ban_repeated_ngrams(tokens, lprobs.clone(), step, n, sink=pad)
        assert torch.equal(got, want), f"step {step}"


def test_tensor_ngram_blocker_matches_the_reference_on_arbitrary_token_rows() -> None:
    gen = torch.Generator().manual_seed(99)
    pad, vocab, width = 1, 7, 11
    for n in (2, 3):
        blocker = reference_blocker(n)
        for step in range(width - 1):
            tokens = torch.randint(0, vocab, (16, width), generator=gen)  # PAD anywhere
            lprobs = torch.randn(16, vocab, generator=gen)
            lprobs[:, pad] = -math.inf
            want = blocker._no_repeat_ngram(tokens, lprobs.clone(), 4, 4, step)
            assert torch.equal(ban_repeated_ngrams(tokens, lprobs.clone(), step, n, pad), want)

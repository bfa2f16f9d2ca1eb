"""Our encoder pass (FastEncoder + ResNetPass) computes what ModelScope's `OFAEncoder` computes,
whatever the checkpoint's settings; and with it the fast generator returns the reference
generator's tokens on a third checkpoint, `tiny-wide`, that differs from `tiny-random` and
`shapes` in every dimension the engine reads from a checkpoint."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_generator_parity import EOS, EOS_BOOST, assert_same_hypotheses, random_images

from capworks.schema.checkpoint import CheckpointConfig, GenerationSettings, read_config
from capworks.workers.engine import OfaEngine
from capworks.workers.generators import make_generator
from capworks.workers.generators.encoder import FastEncoder
from capworks.workers.generators.fast import FastGenerator
from capworks.workers.generators.reference import ReferenceGenerator
from capworks.workers.generators.resnet_pass import ResNetPass
from capworks.workers.ofa_model import encode_prompt, load_model, load_tokenizer

# Hidden states are O(1); the products are shaped differently from ModelScope's.
HIDDEN_TOLERANCE = 1e-4
PROMPT = [0, 99, 473, 5, 2274, 6190, 116, 2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wide_dir(cache_dir: Path) -> Path:
    from capworks.checkpoints.build import ensure_checkpoint

    return ensure_checkpoint("tiny-wide", cache_dir)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> Any:
    return load_model(read_config(tiny_dir, "tiny-random"), CPU, torch.float32)


@pytest.fixture()
def model(tiny_model: Any) -> Any:
    """A copy of tiny-random's model of the test's own, which it may reconfigure."""
    return copy.deepcopy(tiny_model)


def reference_encode(model: Any, ids: torch.Tensor, images: torch.Tensor) -> Any:
    masks = torch.ones(ids.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        return model.encoder(input_ids=ids, patch_images=images, patch_masks=masks)


def assert_same_encoding(model: Any, ids: torch.Tensor, images: torch.Tensor, **opts: Any) -> None:
    want = reference_encode(model, ids, images)
    with torch.inference_mode():
        got = FastEncoder(model.encoder, **opts)(ids, images)
    assert torch.equal(got.padding_mask, want.padding_mask)
    assert torch.equal(got.position_embedding, want.position_embedding)
    torch.testing.assert_close(
        got.last_hidden_state, want.last_hidden_state, rtol=0, atol=HIDDEN_TOLERANCE
    )


def prompts(count: int) -> torch.Tensor:
    return torch.tensor([PROMPT] * count)


@pytest.mark.parametrize("channels_last", [True, False])
def test_resnet_pass_matches_modelscopes_resnet_fused_or_not(
    model: Any, channels_last: bool
) -> None:
    images = random_images(2, 96, seed=1)
    with torch.inference_mode():
        want = model.encoder.embed_images(images)
        fused = ResNetPass(model.encoder.embed_images, channels_last=channels_last)(images)
        plain = ResNetPass(model.encoder.embed_images, channels_last, fuse=False)(images)
    scale = float(want.abs().max())
    torch.testing.assert_close(fused, want, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(plain, fused, rtol=0, atol=1e-5 * scale)


def test_encoder_matches_modelscope_on_tiny_random_at_480_px(model: Any) -> None:
    assert_same_encoding(model, prompts(1), random_images(1, 480, seed=2))


def test_encoder_matches_modelscope_with_padded_prompts(model: Any) -> None:
    ids = prompts(3)
    ids[1, -3:] = 1  # PAD: the padded rows are masked out as keys and zeroed as inputs
    ids[2, -1:] = 1
    assert_same_encoding(model, ids, random_images(3, 64, seed=3))


@pytest.mark.parametrize(
    "setting",
    ["share_attn_bias", "entangle_position_embedding", "interpolate_position", "no_layer_norms"],
)
def test_encoder_follows_the_checkpoints_settings(model: Any, setting: str) -> None:
    enc = model.encoder
    size_px = 64
    if setting == "interpolate_position":
        # Only grids larger than orig_patch_image_size's are interpolated.
        enc.config = copy.copy(enc.config)  # the copied model still shares its config
        enc.config.interpolate_position = True
        size_px = enc.config.orig_patch_image_size + 96
    elif setting == "no_layer_norms":
        enc.layernorm_embedding = enc.patch_layernorm_embedding = enc.type_embedding = None
        for layer in enc.layers:
            layer.self_attn_mid_layer_norm = layer.ffn_layer_norm = None
    else:
        setattr(enc, setting, True)
    assert_same_encoding(model, prompts(2), random_images(2, size_px, seed=4))


def test_encoder_builds_position_biases_once_per_input_shape(model: Any) -> None:
    fast = FastEncoder(model.encoder)
    with torch.inference_mode():
        fast(prompts(2), random_images(2, 64, seed=5))
        first = fast._positions[(4, 4, len(PROMPT), CPU, None)]
        fast(prompts(5), random_images(5, 64, seed=6))  # another batch size, same shape
        assert fast._positions[(4, 4, len(PROMPT), CPU, None)] is first
        fast(prompts(1), random_images(1, 96, seed=7))
    assert len(fast._positions) == 2
    assert all(b.shape[0] == 1 for b in first.bias)  # broadcast over the batch, not copied


def test_a_grid_larger_than_the_image_buckets_is_refused(model: Any) -> None:
    too_big = (model.encoder.image_bucket_size + 1) * 16
    with pytest.raises(ValueError, match="image_bucket_size"), torch.inference_mode():
        FastEncoder(model.encoder)(prompts(1), torch.zeros(1, 3, too_big, too_big))


def test_fast_generator_matches_reference_with_padded_prompts(tiny_dir: Path, model: Any) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    settings = GenerationSettings(max_len_b=6)
    ids = prompts(2)
    ids[0, -2:] = 1
    images = random_images(2, 64, seed=8)
    fast = FastGenerator(model, tokenizer, settings).generate(ids, images)
    ref = ReferenceGenerator(model, tokenizer, settings).generate(ids, images)
    assert_same_hypotheses(fast, ref)


# ---- the third checkpoint -------------------------------------------------------------------


def arch(model_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    return loaded


def test_tiny_wide_differs_from_the_other_checkpoints_in_every_dimension_read(
    wide_dir: Path, tiny_dir: Path
) -> None:
    from capworks.checkpoints.layout import ARCHITECTURES
    from capworks.checkpoints.train_shapes import PATCH_PX

    wide, tiny = read_config(wide_dir, "tiny-wide"), read_config(tiny_dir, "tiny-random")
    wide_arch = arch(wide_dir)
    others = [arch(tiny_dir), {**arch(tiny_dir), **ARCHITECTURES["shapes"]}]
    keys = [
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "resnet_type",
        "token_bucket_size",
        "image_bucket_size",
    ]
    for other in others:
        # shapes has used resnet18 too since its build 4 (a faster build): tiny's resnet50
        # still differs, so an engine with a depth of its own fails on one of them.
        read = [k for k in keys if not (other is others[1] and k == "resnet_type")]
        assert all(wide_arch[k] != other[k] for k in read), [
            k for k in read if wide_arch[k] == other[k]
        ]
    assert wide.patch_image_size not in (tiny.patch_image_size, PATCH_PX)
    assert wide.mean_std != tiny.mean_std  # shapes uses the default normalisation too
    wide_gen, tiny_gen = wide.generation.to_dict(), tiny.generation.to_dict()
    for key in ("beam_size", "max_len_b", "min_len", "no_repeat_ngram_size", "len_penalty"):
        assert wide_gen[key] != tiny_gen[key], key


def jpegs(count: int, seed: int) -> list[bytes]:
    """Noise images of different sizes and contrast, JPEG-encoded."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(count):
        w, h = 200 + 40 * i, 360 - 30 * i
        contrast = 0.2 + 0.8 * i / max(count - 1, 1)
        pixels = 128 + contrast * (rng.random((h, w, 3)) - 0.5) * 255
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    return blobs


def engines(config: CheckpointConfig, model: Any, tokenizer: Any) -> Iterator[OfaEngine]:
    for name in ("fast", "reference"):
        gen = make_generator(name, model, tokenizer, config.generation)
        yield OfaEngine(config, model, tokenizer, gen, CPU, torch.float32, batch_size=8)


def test_fast_generator_matches_reference_on_tiny_wide_with_its_own_settings(
    wide_dir: Path,
) -> None:
    config = read_config(wide_dir, "tiny-wide")
    model, tokenizer = load_model(config, CPU, torch.float32), load_tokenizer(config.model_dir)
    fast, ref = list(engines(config, model, tokenizer))
    try:
        prepared = fast.preprocess(jpegs(5, seed=9))  # the checkpoint's resolution and mean/std
        pixels = [p.pixels for p in prepared if not isinstance(p, Exception)]
        assert len(pixels) == 5 and pixels[0].shape == (3, 320, 320)
        got, want = fast.predict(pixels), ref.predict(pixels)
    finally:
        fast.close()
        ref.close()
    assert all(len(hyps) == config.generation.beam_size for hyps in want)
    assert_same_hypotheses(got, want)


def test_fast_generator_matches_reference_on_tiny_wide_when_hypotheses_end_early(
    wide_dir: Path,
) -> None:
    config = read_config(wide_dir, "tiny-wide")
    model, tokenizer = load_model(config, CPU, torch.float32), load_tokenizer(config.model_dir)
    with torch.no_grad():
        model.decoder.output_projection.weight[EOS] *= EOS_BOOST
    ids = torch.tensor([encode_prompt(tokenizer, config.prompt, config.max_src_length)] * 8)
    images = random_images(8, 96, seed=10)
    fast = FastGenerator(model, tokenizer, config.generation).generate(ids, images)
    ref = ReferenceGenerator(model, tokenizer, config.generation).generate(ids, images)
    assert_same_hypotheses(fast, ref)
    assert len({len(h.tokens) for hyps in ref for h in hyps}) > 2  # really ends at many steps

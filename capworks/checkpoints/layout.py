"""Writing a checkpoint folder in the hub's layout, and the architectures we build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_DIR = Path(__file__).parent / "ofa_tokenizer"
# Bumped when a checkpoint's recipe changes, so a cached build of the old one is rebuilt
# (`build.json` records it; a build without the field is version 1).
BUILD_VERSIONS = {"shapes": 4}
# Said before a build starts, so a first run is not minutes of silence.
BUILD_DURATIONS = {
    "shapes": (
        "training a small OFA captioner, about 3 minutes on 2 CPU cores with bfloat16 units, "
        "about 7 without (once)"
    ),
    "tiny-random": "seeded random weights, seconds",
    "tiny-wide": "seeded random weights, seconds",
    "large-random": "seeded random weights, about a minute",
}
VOCAB_SIZE = 59457  # 50265 BPE entries + 8192 <code_i> + 1000 <bin_i>

# OFA-Sys/OFA models/ofa/ofa.py sizes; only the fields that differ from OFAConfig's defaults.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        d_model=256,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        resnet_type="resnet50",
    ),
    "large": dict(
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=16,
        decoder_attention_heads=16,
        encoder_ffn_dim=4096,
        decoder_ffn_dim=4096,
        resnet_type="resnet152",
    ),
    # Small enough to train to near-perfect captions on two CPU cores in minutes.
    # The ResNet is most of a training step's time: resnet18's 2+2+2 bottlenecks (resnet50's
    # 3+4+6) build it about 1.6x faster with the same held-out score (BENCHMARKS.md).
    "shapes": dict(
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        resnet_type="resnet18",
    ),
    # A parity architecture unlike the others in every dimension an engine reads from a
    # checkpoint: width, layer and head counts (the decoder's differ from the encoder's), ResNet
    # depth (resnet18: 2+2+2 bottlenecks, as shapes; tiny's resnet50 is 3+4+6), bucket sizes,
    # embedding scale, no NormFormer norms.
    "wide": dict(
        d_model=384,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=6,
        decoder_attention_heads=12,
        encoder_ffn_dim=768,
        decoder_ffn_dim=1536,
        resnet_type="resnet18",
        token_bucket_size=128,
        image_bucket_size=24,
        scale_embedding=True,
        normformer=False,
    ),
}


def is_current_build(folder: Path, name: str) -> bool:
    """Whether `folder` holds a complete build of `name` made by today's recipe."""
    try:
        record = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("build_version", 1) == BUILD_VERSIONS.get(
        name, 1
    )


def ofa_config_kwargs(arch: str) -> dict[str, Any]:
    """Full OFAConfig arguments for an architecture (inference-time dropout off)."""
    return dict(
        vocab_size=VOCAB_SIZE,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **ARCHITECTURES[arch],
    )


DEFAULT_BEAM_SEARCH: dict[str, Any] = {"beam_size": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}


def configuration_json(
    patch_image_size: int,
    beam_search: dict[str, Any] | None = None,
    imagenet_mean_std: bool = False,
) -> dict[str, Any]:
    """ModelScope's `configuration.json` for an English OFA captioner."""
    return {
        "framework": "pytorch",
        "task": "image-captioning",
        "pipeline": {"type": "image-captioning"},
        "model": {
            "type": "ofa",
            "beam_search": dict(DEFAULT_BEAM_SEARCH if beam_search is None else beam_search),
            "seed": 7,
            "max_src_length": 256,
            "language": "en",
            "gen_type": "generation",
            "patch_image_size": patch_image_size,
            "max_image_size": patch_image_size,
            "imagenet_default_mean_and_std": imagenet_mean_std,
        },
        "preprocessor": {},
    }


def write_checkpoint(
    model: Any, out_dir: Path, patch_image_size: int, configuration: dict[str, Any] | None = None
) -> None:
    """Save an `OFAModel` and its tokenizer files as the hub lays them out (`configuration`:
    the `configuration.json` contents; the default captioner's when not given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tied embeddings: transformers 4.5x refuses safetensors for them, and the hub ships .bin.
    model.save_pretrained(out_dir, safe_serialization=False)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    (out_dir / "configuration.json").write_text(
        json.dumps(configuration or configuration_json(patch_image_size), indent=4)
    )

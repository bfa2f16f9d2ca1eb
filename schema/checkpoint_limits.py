"""Bounds on what a checkpoint's own files may ask of a worker, checked before the model loads.

A checkpoint folder is data from outside (a hub download, a folder someone mounted), and two of
its files steer what a worker does:

- `config.json` (the architecture) may name `resnet_model_path`, a file ModelScope's `OFAModel`
  `torch.load`s while it builds the model (`modeling_ofa.py`, ModelScope 1.40.2), from any path
  on the host: `/dev/zero` or a FIFO would hold the worker, a large file its memory, and a
  torch older than 2.6 would unpickle it. capworks refuses the key whatever it names, inside
  the folder or not: every ResNet weight of a captioner comes from `pytorch_model.bin`, loaded
  over the model once it is built, so the file could only ever add a second, unreviewed load
  from a path the checkpoint chose. `null` or `""` (what `save_pretrained` writes) pass.
  Its sizes are bounded too: a width or depth far past any OFA release would make building
  the model itself exhaust the host's memory.
- `configuration.json` (the task) sets the image resolution, prompt length and beam search:
  each number is bounded, so a checkpoint cannot make one batch allocate gigabytes or a beam
  search run for ever. The values are checked, never rewritten, so a caption identity's
  settings hash is the one it always was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capworks.schema.errors import CheckpointError

# (low, high) inclusive. The hub's OFA captioners use patch 480, beam 5, 16 new tokens,
# source length 256; the largest OFA (huge) is d_model 1280, 24+12 layers, FFN 5120.
MODEL_INTS: dict[str, tuple[int, int]] = {
    "patch_image_size": (16, 1024),
    "max_src_length": (1, 1024),
    "num_return_sequences": (1, 64),
}
BEAM_INTS: dict[str, tuple[int, int]] = {
    "beam_size": (1, 64),
    "max_len_b": (1, 1024),
    "min_len": (0, 1024),
    "no_repeat_ngram_size": (0, 16),
}
BEAM_FLOATS: dict[str, tuple[float, float]] = {
    "max_len_a": (0.0, 8.0),
    "len_penalty": (-10.0, 10.0),
    "temperature": (0.01, 100.0),
    "unk_penalty": (-100.0, 100.0),
}
MAX_PROMPT_CHARS = 2048
ARCHITECTURE_INTS: dict[str, tuple[int, int]] = {
    "d_model": (8, 8192),
    "encoder_layers": (1, 64),
    "decoder_layers": (1, 64),
    "encoder_attention_heads": (1, 128),
    "decoder_attention_heads": (1, 128),
    "encoder_ffn_dim": (1, 65536),
    "decoder_ffn_dim": (1, 65536),
    "vocab_size": (1, 1_000_000),
    "max_position_embeddings": (1, 8192),
    "token_bucket_size": (1, 4096),
    "image_bucket_size": (1, 1024),
}
# OFAConfig keys that make ModelScope read a file of the checkpoint's choosing.
PATH_KEYS = ("resnet_model_path",)


def check_configuration(model: Any, where: Path) -> None:
    """Raise `CheckpointError` unless `configuration.json`'s `model` section is an object whose
    resolution, prompt and beam-search numbers are within bounds."""
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{where}: 'model' must be an object")
    _check_ints(model, MODEL_INTS, where, "model.")
    prompt = model.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
        raise CheckpointError(
            f"{where}: model.prompt must be text of at most {MAX_PROMPT_CHARS} characters"
        )
    beam = model.get("beam_search", {})
    if not isinstance(beam, Mapping):
        raise CheckpointError(f"{where}: model.beam_search must be an object")
    _check_ints(beam, BEAM_INTS, where, "model.beam_search.")
    _check_floats(beam, BEAM_FLOATS, where, "model.beam_search.")
    if "normalize_scores" in beam and not isinstance(beam["normalize_scores"], bool):
        raise CheckpointError(f"{where}: model.beam_search.normalize_scores must be true or false")
    if beam.get("min_len", 1) > beam.get("max_len_b", 16):
        raise CheckpointError(f"{where}: model.beam_search.min_len is above max_len_b")
    if model.get("num_return_sequences", 1) > beam.get("beam_size", 5):
        raise CheckpointError(f"{where}: model.num_return_sequences is above the beam size")


def check_architecture(path: Path) -> None:
    """Raise `CheckpointError` unless `config.json` names no file to load and its sizes are
    within bounds."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: not a JSON object")
    for key in PATH_KEYS:
        if config.get(key) not in (None, ""):
            raise CheckpointError(
                f"{path}: {key} is refused ({config[key]!r:.120}): ModelScope would torch.load"
                f" that file while building the model; every weight comes from"
                f" pytorch_model.bin, so remove the key or set it to null"
            )
    _check_ints(config, ARCHITECTURE_INTS, path, "")


def _check_ints(
    values: Mapping[str, Any], bounds: dict[str, tuple[int, int]], where: Path, prefix: str
) -> None:
    for name, (low, high) in bounds.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(
                f"{where}: {prefix}{name} must be a whole number from {low:,} to {high:,},"
                f" got {value!r:.40}"
            )


def _check_floats(
    values: Mapping[str, Any], bounds: dict[str, tuple[float, float]], where: Path, prefix: str
) -> None:
    for name, (low, high) in bounds.items():
        if name not in values:
            continue
        value = values[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not low <= value <= high:
            raise CheckpointError(
                f"{where}: {prefix}{name} must be a number from {low:g} to {high:g},"
                f" got {value!r:.40}"
            )

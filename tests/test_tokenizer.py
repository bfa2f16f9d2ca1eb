"""The caption prompt tokenizes exactly as with the real OFA checkpoints."""

from __future__ import annotations

from pathlib import Path

from capworks.schema.checkpoint import read_config
from capworks.workers.ofa_model import encode_prompt, load_tokenizer


def test_prompt_encodes_to_the_reference_ids(tiny_dir: Path) -> None:
    config = read_config(tiny_dir, "tiny-random")
    tokenizer = load_tokenizer(config.model_dir)
    assert config.prompt == " what does the image describe?"
    ids = encode_prompt(tokenizer, config.prompt, config.max_src_length)
    assert ids == [0, 99, 473, 5, 2274, 6190, 116, 2]
    assert len(tokenizer) == 59457

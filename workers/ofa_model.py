"""Loading ModelScope's `OFAModel` and `OFATokenizer` from a checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from capworks.schema.checkpoint import CheckpointConfig

log = logging.getLogger(__name__)
NUM_CODES = 8192
NUM_BINS = 1000


def load_tokenizer(folder: Path) -> Any:
    """The OFA tokenizer of a folder with `vocab.json` and `merges.txt`, with the `<code_i>` and
    `<bin_i>` tokens ModelScope adds (vocab 59457)."""
    from modelscope.models.multi_modal.ofa import OFATokenizer

    tokenizer = OFATokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens([f"<code_{i}>" for i in range(NUM_CODES)])
    tokenizer.add_tokens([f"<bin_{i}>" for i in range(NUM_BINS)])
    return tokenizer


def load_model(config: CheckpointConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """`OFAModel` in eval mode on `device`."""
    from modelscope.models.multi_modal.ofa import OFAModel

    model = OFAModel.from_pretrained(str(config.model_dir))
    model.eval()
    return model.to(device=device, dtype=dtype)


def encode_prompt(tokenizer: Any, prompt: str, max_src_length: int) -> list[int]:
    """BOS + the prompt's tokens (truncated to max_src_length) + EOS, as ModelScope builds it."""
    ids = tokenizer(
        prompt,
        add_special_tokens=False,
        truncation=True,
        max_length=max_src_length,
    ).input_ids
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


def pick_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_precision(
    name: str, device: torch.device, generator: str
) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype) for a dtype option.

    The fast generator keeps fp32 weights and runs under autocast on CUDA (float16 for `auto`);
    the reference generator runs in the weights' own dtype (float32 for `auto`). Half precision
    needs CUDA.
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    wanted = DTYPES[name]
    if wanted not in (None, torch.float32) and device.type != "cuda":
        raise ValueError(f"dtype {name} needs a CUDA device; this run uses {device}")
    if generator == "fast":
        if device.type != "cuda" or wanted == torch.float32:
            return torch.float32, None
        return torch.float32, wanted or torch.float16
    return wanted or torch.float32, None

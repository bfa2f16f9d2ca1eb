"""Repeated n-gram blocking with tensor ops: what fairseq's `NGramRepeatBlock` does, without a
Python loop per hypothesis and without copying tokens to the host."""

from __future__ import annotations

import math

import torch


def ban_repeated_ngrams(
    tokens: torch.Tensor, lprobs: torch.Tensor, step: int, n: int, sink: int
) -> torch.Tensor:
    """Set to -inf, in place, each next token that would repeat an n-gram of its hypothesis."""
    # `tokens` is the whole (hypotheses, width) buffer: BOS in column 0, the hypothesis up to
    # column `step`, PAD after. Like the reference, every window of the row is an n-gram (BOS
    # and the PAD tail included). `sink` must be a column that is already -inf in `lprobs` (the
    # generator bans PAD first): windows that do not match write there, so a single scatter
    # of -inf bans everything without a data-dependent shape (no host sync).
    if n <= 0 or step + 2 - n < 0 or tokens.size(1) < n:
        return lprobs
    windows = tokens.unfold(1, n, 1)  # (hypotheses, width - n + 1, n), a view
    key = tokens[:, step + 2 - n : step + 1]  # the last n - 1 tokens of each hypothesis
    match = (windows[:, :, : n - 1] == key[:, None, :]).all(dim=2)
    banned = torch.where(match, windows[:, :, n - 1], sink)
    return lprobs.scatter_(1, banned, -math.inf)

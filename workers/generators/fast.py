"""A fast beam search for OFA that returns what ModelScope's `SequenceGenerator` returns.

Same search, step for step: BOS-started hypotheses, fp32 log-softmax of the last position divided
by the temperature, EOS banned before `min_len`, PAD banned, the UNK penalty, only EOS at
`max_len`, NaN as -inf, n-gram blocking over the whole token buffer (BOS included), `topk` of
2 x beam candidates, EOS among the first `beam` candidates finalised with the length-normalised
score, sentences with `beam` finished hypotheses dropped from the batch, and the final
`torch.sort` by score. What changes is how each step is computed: see `kv_decoder` (one token
per step with a key/value cache) and `ngram` (blocking with tensor ops on the device). The host
reads one small tensor per step, which it needs anyway to know which sentences are finished.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from capworks.schema.checkpoint import GenerationSettings
from capworks.workers.generators import Hypothesis
from capworks.workers.generators.encoder import FastEncoder
from capworks.workers.generators.kv_decoder import IncrementalDecoder
from capworks.workers.generators.ngram import ban_repeated_ngrams

log = logging.getLogger(__name__)


class StageTimer:
    """Seconds spent per stage; syncs CUDA around each stage so that it is charged its own work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        """Time the body of a `with` block as stage `name`."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] += time.perf_counter() - start


# Encodes (input_ids, patch_images) into what `IncrementalDecoder.start` reads: an object with
# `last_hidden_state`, `padding_mask` and `position_embedding`.
Encoder = Callable[[torch.Tensor, torch.Tensor], Any]


def modelscope_encoder(model: Any) -> Encoder:
    """ModelScope's own `OFAEncoder` forward behind the encoder seam (every patch mask set)."""

    def encode(input_ids: torch.Tensor, patch_images: torch.Tensor) -> Any:
        masks = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return model.encoder(input_ids=input_ids, patch_images=patch_images, patch_masks=masks)

    return encode


class FastGenerator:
    """Beam search with a decoder KV cache and on-device n-gram blocking, equal to the reference.

    The encoder is our own pass (`FastEncoder`) unless another is passed in.
    """

    name = "fast"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: GenerationSettings,
        autocast_dtype: torch.dtype | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        if settings.temperature <= 0:
            raise ValueError("temperature must be greater than 0")
        self.model = model
        self.settings = settings
        self.autocast_dtype = autocast_dtype
        self.encoder: Encoder = FastEncoder(model.encoder) if encoder is None else encoder
        self.decoder = IncrementalDecoder(model.decoder)
        self.pad: int = tokenizer.pad_token_id
        self.unk: int = tokenizer.unk_token_id
        self.bos: int = tokenizer.bos_token_id
        self.eos: int = tokenizer.eos_token_id
        # The reference sizes the search by the tokenizer's id -> token table, not the model.
        ids = set(tokenizer.get_vocab().values()) | set(tokenizer.get_added_vocab().values())
        self.vocab_size = len(ids)
        self.beam_size = min(settings.beam_size, self.vocab_size - 1)
        self.timer: StageTimer | None = None  # set to a StageTimer to profile the stages

    def generate(
        self, input_ids: torch.Tensor, patch_images: torch.Tensor
    ) -> list[list[Hypothesis]]:
        """Hypotheses per image, best first, as ModelScope's generator returns them."""
        device = input_ids.device
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            autocast = torch.autocast(device_type=device.type, dtype=self.autocast_dtype)
        with torch.inference_mode(), autocast:
            return self._generate(input_ids, patch_images)

    def _stage(self, name: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.timer is None:
            return contextlib.nullcontext()
        return self.timer.stage(name, device)

    def _generate(
        self, input_ids: torch.Tensor, patch_images: torch.Tensor
    ) -> list[list[Hypothesis]]:
        s = self.settings
        device = input_ids.device
        bsz, src_len = input_ids.shape
        beam = self.beam_size
        max_len = int(s.max_len_a * src_len + s.max_len_b)
        if s.min_len > max_len:
            raise ValueError("min_len cannot be larger than max_len")

        with self._stage("encoder", device):
            encoder_out = self.encoder(input_ids, patch_images)
            state = self.decoder.start(encoder_out, beam, max_len + 1)
            del encoder_out

        # +2 columns: EOS and a PAD tail, which the n-gram blocker scans as the reference does.
        tokens = torch.full((bsz * beam, max_len + 2), self.pad, dtype=torch.long, device=device)
        tokens[:, 0] = self.bos
        cum_scores = torch.zeros(bsz * beam, dtype=torch.float32, device=device)
        cands_to_ignore = torch.zeros(bsz, beam, dtype=torch.bool, device=device)
        cand_offsets = torch.arange(2 * beam, device=device)
        alive = list(range(bsz))  # original index of each sentence still in the batch
        finalized: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(bsz)]
        finished = [False] * bsz

        for step in range(max_len + 1):
            with self._stage("decoder", device):
                logits = self.decoder.step(state, tokens[:, step], step)
                lprobs = F.log_softmax(logits.div(s.temperature), dim=-1, dtype=torch.float32)
            with self._stage("search", device):
                cand_scores, cand_indices, cand_beams = self._candidates(
                    lprobs, tokens, cum_scores, step, max_len, bsz
                )
                eos_mask = cand_indices.eq(self.eos) & cand_scores.ne(-math.inf)
                eos_mask[:, :beam] &= ~cands_to_ignore
                # The one host read per step: the normalised scores of the top candidates that
                # end in EOS (divided on the device by a Python float, as the reference does).
                eos_top = cand_scores[:, :beam].masked_fill(~eos_mask[:, :beam], math.nan)
                if s.normalize_scores:
                    eos_top = eos_top / (step + 1) ** s.len_penalty
                packed = torch.stack([eos_top, cand_beams[:, :beam].to(eos_top.dtype)]).cpu()
                newly_finished = self._finalize(
                    packed, tokens, step, max_len, alive, finalized, finished
                )
                if all(finished) or step >= max_len:
                    break

                # Drop the sentences that just got their `beam` hypotheses.
                old_rows: torch.Tensor | None = None  # cache row of each kept sentence's beam 0
                if newly_finished:
                    done = set(newly_finished)
                    kept = [i for i in range(bsz) if i not in done]
                    keep = torch.tensor(kept, dtype=torch.long, device=device)
                    eos_mask, cand_beams, cand_scores, cand_indices, cands_to_ignore = (
                        t.index_select(0, keep)
                        for t in (eos_mask, cand_beams, cand_scores, cand_indices, cands_to_ignore)
                    )
                    tokens = tokens.view(bsz, -1).index_select(0, keep)
                    tokens = tokens.view(len(kept) * beam, -1)
                    alive = [alive[i] for i in kept]
                    self.decoder.keep_images(state, keep)
                    old_rows = keep[:, None] * beam
                    bsz = len(kept)

                # Continue with the best `beam` candidates that neither end nor are ignored
                # (the reference's active_mask: ending candidates sort after all others).
                eos_mask[:, :beam] |= cands_to_ignore
                active_mask = eos_mask.long() * (2 * beam) + cand_offsets[: eos_mask.size(1)]
                new_ignore, active_hypos = torch.topk(active_mask, k=beam, dim=1, largest=False)
                cands_to_ignore = new_ignore.ge(2 * beam)[:, :beam]
                chosen_beams = torch.gather(cand_beams, 1, active_hypos)
                rows = torch.arange(bsz, device=device)[:, None] * beam
                active_bbsz_idx = (chosen_beams + rows).view(-1)
                cum_scores = torch.gather(cand_scores, 1, active_hypos).view(-1)
                tokens[:, : step + 1] = tokens[:, : step + 1].index_select(0, active_bbsz_idx)
                tokens.view(bsz, beam, -1)[:, :, step + 1] = torch.gather(
                    cand_indices, 1, active_hypos
                )
                # The self-attention cache still has a row per hypothesis of the batch before
                # dropping sentences.
                cache_rows = active_bbsz_idx if old_rows is None else (chosen_beams + old_rows)
                self.decoder.reorder(state, cache_rows.view(-1))

        log.debug("fast generator: %d images, %d steps", len(finalized), step + 1)
        return [self._sorted(hyps) for hyps in finalized]

    def _candidates(
        self,
        lprobs: torch.Tensor,
        tokens: torch.Tensor,
        cum_scores: torch.Tensor,
        step: int,
        max_len: int,
        bsz: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask the log-probabilities as the reference does and take its top 2 x beam candidates."""
        s, beam, vocab = self.settings, self.beam_size, self.vocab_size
        if step < s.min_len:
            lprobs[:, self.eos] = -math.inf
        torch.nan_to_num_(lprobs, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        lprobs[:, self.pad] = -math.inf
        lprobs[:, self.unk] -= s.unk_penalty
        if step >= max_len:
            lprobs[:, : self.eos] = -math.inf
            lprobs[:, self.eos + 1 :] = -math.inf
        if s.no_repeat_ngram_size > 0:
            ban_repeated_ngrams(tokens, lprobs, step, s.no_repeat_ngram_size, sink=self.pad)
        by_beam = lprobs.view(bsz, -1, vocab)
        if step == 0:
            by_beam = by_beam[:, ::beam, :].contiguous()  # all beams equal: use the first only
        else:
            by_beam = by_beam + cum_scores.view(bsz, beam, 1)
        flat = by_beam.view(bsz, -1)
        top_scores, top_idx = torch.topk(flat, k=min(2 * beam, flat.size(1) - 1))
        beams = torch.div(top_idx, vocab, rounding_mode="floor")
        return top_scores, top_idx.fmod(vocab), beams

    def _finalize(
        self,
        packed: torch.Tensor,
        tokens: torch.Tensor,
        step: int,
        max_len: int,
        alive: list[int],
        finalized: list[list[tuple[tuple[int, ...], float]]],
        finished: list[bool],
    ) -> list[int]:
        """Store hypotheses ending in EOS; the batch positions of sentences that became finished."""
        eos_top, beams = packed[0], packed[1]
        ends = ~torch.isnan(eos_top)
        if not bool(ends.any()):
            return []
        group_idx, cand_idx = ends.nonzero(as_tuple=True)
        scores = eos_top[group_idx, cand_idx]
        rows = (group_idx * self.beam_size + beams[group_idx, cand_idx].long()).tolist()
        prefix = tokens[:, 1 : step + 1].cpu().tolist()
        seen: list[int] = []
        for group, row, score in zip(group_idx.tolist(), rows, scores.tolist(), strict=True):
            sent = alive[group]
            if len(finalized[sent]) < self.beam_size:
                finalized[sent].append(((*prefix[row], self.eos), score))
            if not seen or seen[-1] != group:
                seen.append(group)
        newly: list[int] = []
        for group in seen:
            sent = alive[group]
            if not finished[sent] and (len(finalized[sent]) == self.beam_size or step == max_len):
                finished[sent] = True
                newly.append(group)
        return newly

    @staticmethod
    def _sorted(hyps: list[tuple[tuple[int, ...], float]]) -> list[Hypothesis]:
        # The same call as the reference's, so that equal scores keep the reference's order.
        _, order = torch.sort(torch.tensor([score for _, score in hyps]), descending=True)
        return [Hypothesis(hyps[i][0], hyps[i][1]) for i in order.tolist()]

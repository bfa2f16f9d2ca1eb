"""Incremental OFA decoding with a key/value cache, on the weights of ModelScope's `OFADecoder`.

ModelScope's generator re-runs the decoder on the whole prefix at every step (the incremental
state it passes is an empty dict, so the decoder's cached path is never taken) and projects every
position onto the vocabulary. Here each step feeds one token per hypothesis:

- self-attention keys/values grow by one position per step and follow the beams' reordering;
- cross-attention keys/values are projected once per image; the `beam` hypotheses of an image
  attend to them together as one small matrix of queries, so nothing is copied per beam;
- the position biases (absolute + relative for self-attention, absolute for cross-attention)
  depend on positions only, so they are computed once per batch for every step and sliced.

The arithmetic per element is the reference's (same modules, same order of operations); only the
matrix products are shaped differently, which can change the last bits of a float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class DecoderState:
    """Per-batch caches of an incremental decode: one entry per decoder layer."""

    beam: int
    self_k: list[torch.Tensor | None]  # (hypotheses, heads, steps so far, head_dim)
    self_v: list[torch.Tensor | None]
    cross_k: list[torch.Tensor]  # (images, heads, source length, head_dim)
    cross_v: list[torch.Tensor]
    self_bias: list[torch.Tensor]  # (heads, positions, positions)
    cross_bias: torch.Tensor  # (images, heads, positions, source length)
    encoder_mask: torch.Tensor | None  # (images, 1, 1, source length), additive; None: no padding
    pos_embed: torch.Tensor  # (positions, d_model), only used with entangled position embeddings
    pending_order: torch.Tensor | None = field(default=None)


class IncrementalDecoder:
    """One-token-per-step forward of an `OFADecoder`, equal to its full-prefix forward."""

    def __init__(self, decoder: Any) -> None:
        if getattr(decoder, "use_ofasys", False):
            raise NotImplementedError("the fast generator supports OFA, not OFA-Sys, checkpoints")
        self.decoder = decoder
        self.layers: list[Any] = list(decoder.layers)
        first = self.layers[0].self_attn
        self.heads: int = first.num_heads
        self.head_dim: int = first.head_dim
        self.d_model: int = first.embed_dim

    def start(self, encoder_out: Any, beam: int, positions: int) -> DecoderState:
        """Caches for a batch: cross keys/values per image, position biases for `positions`."""
        dec = self.decoder
        hidden = encoder_out.last_hidden_state  # (images, source, d_model)
        images, source = hidden.shape[:2]
        pos = torch.arange(positions, device=hidden.device)[None, :]
        tgt_pos_embed = dec.embed_positions(pos)  # (1, positions, d_model)
        self_abs = dec.get_pos_info(tgt_pos_embed)[0]  # (heads, positions, positions)
        self_bias = []
        for idx in range(len(self.layers)):
            real_idx = 0 if dec.share_attn_bias else idx
            # In the model's dtype, as the reference's in-place `+=` leaves it.
            rel = dec.get_rel_pos_bias(pos, real_idx)
            self_bias.append((self_abs + rel).to(self_abs.dtype))
        cross_bias = dec.get_pos_info(
            tgt_pos_embed.expand(images, -1, -1), src_pos_embed=encoder_out.position_embedding
        )
        cross_k, cross_v = [], []
        for layer in self.layers:
            attn = layer.cross_attn
            cross_k.append(self._heads(attn.k_proj(hidden), images, source))
            cross_v.append(self._heads(attn.v_proj(hidden), images, source))
        padding = encoder_out.padding_mask
        encoder_mask = None
        if bool(padding.any()):  # one host sync per batch; prompts of one length have no padding
            encoder_mask = torch.zeros(padding.shape, dtype=hidden.dtype, device=hidden.device)
            encoder_mask = encoder_mask.masked_fill(padding, torch.finfo(hidden.dtype).min)
            encoder_mask = encoder_mask[:, None, None, :]
        n_layers = len(self.layers)
        return DecoderState(
            beam=beam,
            self_k=[None] * n_layers,
            self_v=[None] * n_layers,
            cross_k=cross_k,
            cross_v=cross_v,
            self_bias=self_bias,
            cross_bias=cross_bias,
            encoder_mask=encoder_mask,
            pos_embed=tgt_pos_embed[0],
        )

    def _heads(self, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2).contiguous()

    @staticmethod
    def reorder(state: DecoderState, order: torch.Tensor) -> None:
        """Make hypothesis i continue the cached prefix of hypothesis `order[i]` (lazily)."""
        state.pending_order = order

    @staticmethod
    def keep_images(state: DecoderState, keep: torch.Tensor) -> None:
        """Drop the cross-attention caches of finished images; `keep` indexes the current images."""
        state.cross_k = [k.index_select(0, keep) for k in state.cross_k]
        state.cross_v = [v.index_select(0, keep) for v in state.cross_v]
        state.cross_bias = state.cross_bias.index_select(0, keep)
        if state.encoder_mask is not None:
            state.encoder_mask = state.encoder_mask.index_select(0, keep)

    def step(self, state: DecoderState, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (hypotheses, vocab) for the next token after `tokens` at `position`."""
        dec = self.decoder
        x = dec.embed_scale * dec.embed_tokens(tokens[:, None])  # (hypotheses, 1, d_model)
        if dec.entangle_position_embedding and not dec.disable_entangle:
            x = x + state.pos_embed[position]
        if dec.layernorm_embedding is not None:
            x = dec.layernorm_embedding(x)
        order, state.pending_order = state.pending_order, None
        for idx, layer in enumerate(self.layers):
            x = self._layer(state, idx, layer, x, position, order)
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        logits: torch.Tensor = dec.output_projection(x)
        return logits[:, 0, :]

    def _layer(
        self,
        state: DecoderState,
        idx: int,
        layer: Any,
        x: torch.Tensor,
        position: int,
        order: torch.Tensor | None,
    ) -> torch.Tensor:
        # Dropout and drop-path are identities at inference and are left out.
        pre = layer.normalize_before
        gamma = layer.use_gamma_feature

        def ffn(h: torch.Tensor) -> torch.Tensor:
            h = layer.activation_fn(layer.fc1(h))
            out: torch.Tensor = layer.fc2(
                h if layer.ffn_layer_norm is None else layer.ffn_layer_norm(h)
            )
            return out

        x = _sublayer(
            x,
            pre,
            layer.self_attn_layer_norm,
            layer.self_attn_mid_layer_norm,
            layer.weight_self_attn if gamma else None,
            lambda h: self._self_attention(state, idx, layer.self_attn, h, position, order),
        )
        x = _sublayer(
            x,
            pre,
            layer.cross_attn_layer_norm,
            layer.cross_attn_mid_layer_norm,
            layer.weight_cross_attn if gamma else None,
            lambda h: self._cross_attention(state, idx, layer.cross_attn, h, position),
        )
        return _sublayer(
            x, pre, layer.final_layer_norm, None, layer.weight_ffn if gamma else None, ffn
        )

    def _self_attention(
        self,
        state: DecoderState,
        idx: int,
        attn: Any,
        h: torch.Tensor,
        position: int,
        order: torch.Tensor | None,
    ) -> torch.Tensor:
        n = h.size(0)
        q = (attn.q_proj(h) * attn.scaling).view(n, self.heads, 1, self.head_dim)
        k_new = attn.k_proj(h).view(n, self.heads, 1, self.head_dim)
        v_new = attn.v_proj(h).view(n, self.heads, 1, self.head_dim)
        k_old, v_old = state.self_k[idx], state.self_v[idx]
        if k_old is not None and v_old is not None:
            if order is not None:
                k_old, v_old = k_old.index_select(0, order), v_old.index_select(0, order)
            k_new = torch.cat([k_old, k_new], dim=2)
            v_new = torch.cat([v_old, v_new], dim=2)
        state.self_k[idx], state.self_v[idx] = k_new, v_new
        steps = k_new.size(2)
        weights = torch.matmul(q, k_new.transpose(2, 3))  # (n, heads, 1, steps)
        weights = weights + state.self_bias[idx][:, position : position + 1, :steps]
        probs = F.softmax(weights, dim=-1)
        out = torch.matmul(probs, v_new).transpose(1, 2)  # (n, 1, heads, head_dim)
        return self._merge_heads(attn, out, n)

    def _cross_attention(
        self, state: DecoderState, idx: int, attn: Any, h: torch.Tensor, position: int
    ) -> torch.Tensor:
        n = h.size(0)
        images = n // state.beam
        q = (attn.q_proj(h) * attn.scaling).view(images, state.beam, self.heads, self.head_dim)
        q = q.transpose(1, 2)  # (images, heads, beam, head_dim): an image's beams share its keys
        weights = torch.matmul(q, state.cross_k[idx].transpose(2, 3))  # (images, heads, beam, src)
        weights = weights + state.cross_bias[:, :, position : position + 1, :]
        if state.encoder_mask is not None:
            weights = weights + state.encoder_mask
        probs = F.softmax(weights, dim=-1)
        out = torch.matmul(probs, state.cross_v[idx])  # (images, heads, beam, head_dim)
        out = out.transpose(1, 2).reshape(n, 1, self.heads, self.head_dim)
        return self._merge_heads(attn, out, n)

    def _merge_heads(self, attn: Any, out: torch.Tensor, n: int) -> torch.Tensor:
        if attn.c_attn is not None:
            out = torch.einsum("bthd,h->bthd", out, attn.c_attn)
        result: torch.Tensor = attn.out_proj(out.reshape(n, 1, self.d_model))
        return result


def _sublayer(
    x: torch.Tensor,
    pre: bool,
    norm: Any,
    mid_norm: Any | None,
    weight: torch.Tensor | None,
    body: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One residual block of an OFA decoder layer: (pre-)norm, body, NormFormer's mid norm,
    the optional gamma scale, the residual add, and the post-norm when not pre-normalised."""
    h = body(norm(x) if pre else x)
    if mid_norm is not None:
        h = mid_norm(h)
    if weight is not None:
        h = weight * h
    x = x + h
    return x if pre else norm(x)

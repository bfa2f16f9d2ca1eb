"""OFA's encoder (ResNet + transformer layers) as our own pass, on the weights of ModelScope's
`OFAEncoder`.

What ModelScope's forward does per batch that this pass does not:

- the attention bias of every layer (absolute position bias from `pos_q_linear`/`pos_k_linear`,
  plus the text and image relative-position tables) is rebuilt per image and per layer, with an
  index gather over (images, patches, patches). It depends on positions and weights only, so it
  is built once per input shape (grid height x width x text length) with a batch dimension of 1,
  kept, and broadcast over the batch;
- attention materialises (images x heads, source, source) weights; here it goes through
  `scaled_dot_product_attention` with the bias as its additive mask. OFA scales the queries
  before the product (`q_proj(h) * scaling`) and adds the bias to the unscaled product, so the
  queries are scaled as OFA does and the kernel's own scale is 1;
- the ResNet runs on folded BatchNorm in `channels_last` (see `resnet_pass`);
- no hidden states or attentions are kept.

Every setting (widths, heads, layers, bucket sizes, pre/post norm, NormFormer norms, embedding
scale, type embeddings, entangled or interpolated positions) is read from the modules and the
model's config. The products are shaped differently from ModelScope's, which can change the last
bits of a float; the tests check that captions are token-identical.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from capworks.workers.generators.resnet_pass import ResNetPass

BIAS_CACHE_SHAPES = 4  # input shapes whose attention biases are kept (one per batch shape used)


@dataclass(frozen=True)
class EncoderOutput:
    """What the decoder reads from an encoder pass (named as in ModelScope's `OFAEncoderOutput`)."""

    last_hidden_state: torch.Tensor  # (images, source, d_model)
    padding_mask: torch.Tensor  # (images, source), True at padding
    position_embedding: torch.Tensor  # (images, source, d_model), a broadcast view


@dataclass(frozen=True)
class PositionInfo:
    """Everything of an input shape that depends on positions only."""

    pos_embed: torch.Tensor  # (1, source, d_model): layer-normed image then text positions
    image_pos_raw: torch.Tensor  # (1, patches, d_model), before its layer norm
    text_pos_raw: torch.Tensor  # (1, text, d_model), before its layer norm
    bias: list[torch.Tensor]  # per layer: (1, heads, source, source)


class FastEncoder:
    """Inference forward of an `OFAEncoder`, equal to `encoder(input_ids, patch_images, masks)`
    with every patch mask set.

    The folded ResNet weights and the position biases are taken from the model when first
    needed and kept: build a new encoder (a new generator) after changing the model's weights.
    """

    def __init__(self, encoder: Any, channels_last: bool = True) -> None:
        if getattr(encoder, "use_ofasys", False):
            raise NotImplementedError("the fast encoder supports OFA, not OFA-Sys, checkpoints")
        if not hasattr(encoder, "embed_images"):
            raise NotImplementedError("the fast encoder needs an image encoder (use_image_feature)")
        self.encoder = encoder
        self.config = encoder.config
        self.layers: list[Any] = list(encoder.layers)
        self.heads: int = encoder.num_attention_heads
        self.resnet = ResNetPass(encoder.embed_images, channels_last=channels_last)
        self._positions: OrderedDict[tuple[Any, ...], PositionInfo] = OrderedDict()

    def __call__(self, input_ids: torch.Tensor, patch_images: torch.Tensor) -> EncoderOutput:
        """Encode a batch: one prompt row and one image per row."""
        enc = self.encoder
        features = self.resnet(patch_images)  # (images, channels, h, w)
        images, _, h, w = features.shape
        text_len = input_ids.size(1)
        info = self._position_info(h, w, text_len, features.device)

        # (images, h*w, channels): contiguous already when the ResNet ran channels_last.
        image_x = enc.image_proj(features.flatten(2).transpose(1, 2))
        image_x = enc.embed_scale * image_x
        text_x = enc.embed_scale * enc.embed_tokens(input_ids)
        if enc.entangle_position_embedding:
            image_x = image_x + info.image_pos_raw
            text_x = text_x + info.text_pos_raw
        if enc.type_embedding is not None:
            text_x = text_x + enc.type_embedding.weight[0]
            image_x = image_x + enc.type_embedding.weight[1]
        if enc.layernorm_embedding is not None:
            text_x = enc.layernorm_embedding(text_x)
        if enc.patch_layernorm_embedding is not None:
            image_x = enc.patch_layernorm_embedding(image_x)
        x = torch.cat([image_x, text_x], dim=1)

        text_pad = input_ids.eq(enc.padding_idx)
        padding_mask = torch.cat([text_pad.new_zeros(images, h * w), text_pad], dim=1)
        masks = info.bias
        if bool(text_pad.any()):  # one host sync per batch; prompts of one length have no padding
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
            additive = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            additive = additive.masked_fill(padding_mask, torch.finfo(x.dtype).min)
            # ModelScope adds the bias, then the mask; with the mask's zeros elsewhere the sum
            # is the bias exactly, and masked keys get probability 0 either way.
            masks = [b + additive[:, None, None, :] for b in masks]

        for idx, layer in enumerate(self.layers):
            x = self._layer(layer, x, masks[idx])
        if enc.layer_norm is not None:
            x = enc.layer_norm(x)
        pos = info.pos_embed.expand(images, -1, -1)
        return EncoderOutput(last_hidden_state=x, padding_mask=padding_mask, position_embedding=pos)

    def _position_info(self, h: int, w: int, text_len: int, device: torch.device) -> PositionInfo:
        autocast = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else None
        )
        key = (h, w, text_len, device, autocast)
        info = self._positions.get(key)
        if info is None:
            info = self._build_position_info(h, w, text_len, device)
            self._positions[key] = info
            while len(self._positions) > BIAS_CACHE_SHAPES:
                self._positions.popitem(last=False)
        else:
            self._positions.move_to_end(key)
        return info

    def _image_positions(
        self, h: int, w: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (h*w,) in the image bucket grid and their embeddings (1, h*w, d_model)."""
        enc, cfg = self.encoder, self.config
        bucket = enc.image_bucket_size
        if h > bucket or w > bucket:
            raise ValueError(
                f"a {h}x{w} patch grid exceeds the checkpoint's image_bucket_size {bucket}"
            )
        ids = (torch.arange(w)[None, :] + torch.arange(h)[:, None] * bucket + 1).view(-1)
        ids = ids.to(device)
        # ModelScope's own rule, with its patch stride of 16 written into it.
        orig_hw = cfg.orig_patch_image_size // 16
        if cfg.interpolate_position and h * w > orig_hw * orig_hw:
            old = torch.arange(orig_hw)[None, :] + torch.arange(orig_hw)[:, None] * bucket + 1
            old_embed = enc.embed_image_positions(old.to(device))
            old_embed = old_embed.reshape(1, orig_hw, orig_hw, -1).permute(0, 3, 1, 2)
            embed = F.interpolate(old_embed, size=(h, w), mode="bilinear")
            embed = embed.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        else:
            embed = enc.embed_image_positions(ids)[None]
        return ids, embed

    def _build_position_info(
        self, h: int, w: int, text_len: int, device: torch.device
    ) -> PositionInfo:
        enc = self.encoder
        image_ids, image_pos_raw = self._image_positions(h, w, device)
        text_pos_raw = enc.embed_positions(torch.arange(text_len, device=device))[None]
        pos_embed = torch.cat([enc.image_pos_ln(image_pos_raw), enc.pos_ln(text_pos_raw)], dim=1)
        source = pos_embed.size(1)
        patches = h * w

        # The absolute bias of ModelScope's `build_abs_pos_bias`, with a batch of one.
        heads = self.heads
        pos_q = enc.pos_q_linear(pos_embed).view(1, source, heads, -1).transpose(1, 2)
        pos_q = pos_q * enc.pos_scaling
        pos_k = enc.pos_k_linear(pos_embed).view(1, source, heads, -1).transpose(1, 2)
        abs_bias = torch.matmul(pos_q, pos_k.transpose(2, 3))  # (1, heads, source, source)

        image_bucket = enc.image_rp_bucket.index_select(0, image_ids).index_select(1, image_ids)
        text_bucket = enc.token_rp_bucket[:text_len, :text_len]
        biases: list[torch.Tensor] = []
        shared: torch.Tensor | None = None
        for idx in range(len(self.layers)):
            real_idx = 0 if enc.share_attn_bias else idx
            if shared is not None and enc.share_attn_bias:
                biases.append(shared)
                continue
            bias = abs_bias.clone()
            text_rel = F.embedding(text_bucket, enc.token_rel_pos_table_list[real_idx].weight)
            bias[:, :, -text_len:, -text_len:] += text_rel.permute(2, 0, 1)
            image_rel = F.embedding(image_bucket, enc.image_rel_pos_table_list[real_idx].weight)
            bias[:, :, :patches, :patches] += image_rel.permute(2, 0, 1)
            shared = bias
            biases.append(bias)
        return PositionInfo(pos_embed, image_pos_raw, text_pos_raw, biases)

    def _layer(self, layer: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # Dropout and drop-path are identities at inference and are left out.
        pre = layer.normalize_before
        residual = x
        h = layer.self_attn_layer_norm(x) if pre else x
        h = self._attention(layer.self_attn, h, bias)
        if layer.self_attn_mid_layer_norm is not None:
            h = layer.self_attn_mid_layer_norm(h)
        x = residual + h
        if not pre:
            x = layer.self_attn_layer_norm(x)

        residual = x
        h = layer.final_layer_norm(x) if pre else x
        h = layer.activation_fn(layer.fc1(h))
        if layer.ffn_layer_norm is not None:
            h = layer.ffn_layer_norm(h)
        x = residual + layer.fc2(h)
        if not pre:
            x = layer.final_layer_norm(x)
        if x.dtype == torch.float16:
            # ModelScope clamps a half-precision layer output that holds an inf or a NaN; this
            # does the same without reading the condition on the host.
            limit = torch.finfo(x.dtype).max - 1000
            bad = torch.isinf(x).any() | torch.isnan(x).any()
            x = torch.where(bad, x.clamp(min=-limit, max=limit), x)
        return x

    def _attention(self, attn: Any, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, d_model = h.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        q = (attn.q_proj(h) * attn.scaling).view(n, length, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, length, heads, head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(n, length, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        out = out.transpose(1, 2)  # (n, length, heads, head_dim)
        if attn.c_attn is not None:
            out = out * attn.c_attn[:, None]
        result: torch.Tensor = attn.out_proj(out.reshape(n, length, d_model))
        return result

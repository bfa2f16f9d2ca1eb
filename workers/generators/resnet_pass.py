"""The image backbone of OFA (ModelScope's `ResNet`) as plain convolutions on folded weights.

ModelScope's ResNet runs each convolution, then a separate BatchNorm pass, then a ReLU pass, in
NCHW. At inference BatchNorm is an affine map per channel, so it is folded into the weights and
bias of the convolution before it (computed once, in float64); activations stay in
`channels_last` (NHWC), where oneDNN's CPU convolutions need no layout reorders; and on the CPU
the ReLUs and the residual additions run inside the convolutions (oneDNN post-ops, through the
`mkldnn::_convolution_pointwise` operators that torch's own inductor uses) instead of as
separate passes over memory. The structure (stem, stages, blocks per stage, strides, widths) is
read from the modules, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with the BatchNorm after it folded into its weight and bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return out

    def relu(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        """relu(conv(x))."""
        if not fused:
            return F.relu_(self(x))
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, *self._geometry(), "relu", [], ""
        )
        return out

    def add_relu(self, x: torch.Tensor, other: torch.Tensor, fused: bool) -> torch.Tensor:
        """relu(conv(x) + other)."""
        if not fused:
            return F.relu_(self(x).add_(other))
        out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, *self._geometry(), "add", None, "relu", [], ""
        )
        return out

    def _geometry(self) -> tuple[list[int], list[int], list[int], int]:
        return list(self.padding), list(self.stride), list(self.dilation), self.groups


@dataclass(frozen=True)
class FoldedBottleneck:
    """conv1x1-relu, conv3x3-relu, conv1x1, plus the (projected) identity, relu."""

    convs: tuple[FoldedConv, FoldedConv, FoldedConv]
    downsample: FoldedConv | None


def fold_conv_bn(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, memory_format: torch.memory_format
) -> FoldedConv:
    """`bn(conv(x))` as one convolution (eval-mode BatchNorm: running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError("only zero-padded convolutions with numeric padding")
    dtype = conv.weight.dtype
    w = conv.weight.detach().double()
    gamma = (
        bn.weight.detach().double()
        if bn.weight is not None
        else torch.ones_like(bn.running_var, dtype=torch.float64)
    )
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(gamma)
    scale = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = beta - bn.running_mean.detach().double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    weight = (w * scale[:, None, None, None]).to(dtype).contiguous(memory_format=memory_format)
    return FoldedConv(
        weight,
        bias.to(dtype),
        tuple(conv.stride),
        tuple(conv.padding),
        tuple(conv.dilation),
        conv.groups,
    )


def _stages(resnet: nn.Module) -> list[nn.Sequential]:
    stages = []
    index = 1
    while isinstance(getattr(resnet, f"layer{index}", None), nn.Sequential):
        stages.append(getattr(resnet, f"layer{index}"))
        index += 1
    if not stages:
        raise NotImplementedError(f"{type(resnet).__name__} has no layer1, layer2, ... stages")
    return stages


def _fold_block(block: Any, fmt: torch.memory_format) -> FoldedBottleneck:
    parts = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    if not all(isinstance(getattr(block, p, None), nn.Module) for p in parts):
        raise NotImplementedError(f"unsupported ResNet block {type(block).__name__}")
    if not isinstance(getattr(block, "drop_path", nn.Identity()), nn.Module):
        raise NotImplementedError("unexpected drop_path in a ResNet block")
    convs = (
        fold_conv_bn(block.conv1, block.bn1, fmt),
        fold_conv_bn(block.conv2, block.bn2, fmt),
        fold_conv_bn(block.conv3, block.bn3, fmt),
    )
    downsample = None
    if block.downsample is not None:
        conv, bn = block.downsample  # ModelScope: Sequential(conv1x1, BatchNorm2d)
        downsample = fold_conv_bn(conv, bn, fmt)
    return FoldedBottleneck(convs, downsample)


def can_fuse(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolutions apply: float32 on a CPU with mkldnn."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


class ResNetPass:
    """Inference forward of an OFA `ResNet`, equal to the module's eval-mode forward."""

    def __init__(self, resnet: nn.Module, channels_last: bool = True, fuse: bool = True) -> None:
        self.fuse = fuse
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        fmt = self.memory_format
        self.stem = fold_conv_bn(resnet.conv1, resnet.bn1, fmt)  # type: ignore[arg-type]
        pool = resnet.maxpool
        if not isinstance(pool, nn.MaxPool2d):
            raise NotImplementedError(f"unsupported ResNet stem pool {type(pool).__name__}")
        self.pool = pool
        self.blocks = [_fold_block(b, fmt) for stage in _stages(resnet) for b in stage]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Feature map (batch, channels, h, w), in `channels_last` memory when enabled."""
        x = images.contiguous(memory_format=self.memory_format)
        fused = self.fuse and can_fuse(x)
        x = self.stem.relu(x, fused)
        p = self.pool
        x = F.max_pool2d(x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)
        for block in self.blocks:
            c1, c2, c3 = block.convs
            out = c2.relu(c1.relu(x, fused), fused)
            identity = x if block.downsample is None else block.downsample(x)
            x = c3.add_relu(out, identity, fused)
        return x

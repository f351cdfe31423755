"""The causal network of the learned codec, in torch, with its integer-exact (QAT) form.

Architecture (docs/design.md, "The learned codec"): a mask-A 7×7 convolution over the 4 integer
features (models/features.py), residual mask-B 3×3 blocks, a 1×1 hidden layer and a 1×1 head
giving the mean (in units of the image's mean residual, added to the MED prediction) and the
log2 scale (relative to the same unit) of a discretized logistic.

Why fake quantisation is built into every layer rather than applied afterwards: the codec runs
the integer network (int8 weights, power-of-two scale per layer, integer bias, activations
floored and clipped to 0..127), and rounding a float network after training costs up to 16 %
(docs/design.md). With `qat=True` the forward pass computes exactly the integer network's values,
with straight-through gradients, so the fine-tune trains what is shipped.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ..features import FEATURE_SHIFT, N_FEATURES, SCALE_STEPS

ACT_SHIFT = 4  # hidden activations are integers 0..127 meaning a/16
ACT_MAX = 127


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def causal_mask(kernel: int, include_centre: bool) -> torch.Tensor:
    """PixelCNN mask: rows above, and the left of the current row (and its centre for mask B)."""
    mask = torch.zeros(kernel, kernel)
    c = kernel // 2
    mask[:c, :] = 1
    mask[c, : c + int(include_centre)] = 1
    return mask


class QConv(nn.Module):
    """A (masked) convolution whose QAT form is int8 weights × 2^-e with an integer bias.

    `in_shift` is the input's fixed-point position (value = integer / 2^in_shift); the integer
    accumulator is Σ w_int·a_int + b_int and its real value acc · 2^-(e + in_shift).
    """

    def __init__(self, cin: int, cout: int, kernel: int, mask: torch.Tensor | None, in_shift: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        fan_in = cin * (kernel * kernel if mask is None else int(mask.sum()))
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / fan_in))
        self.register_buffer("mask", torch.ones(kernel, kernel) if mask is None else mask)
        self.in_shift = in_shift
        self.pad = kernel // 2

    def exponent(self) -> int:
        """Largest e with every |w|·2^e ≤ 127: the layer's power-of-two weight scale."""
        peak = float((self.weight * self.mask).detach().abs().max().clamp_min(1e-8))
        return math.floor(math.log2(ACT_MAX / peak))

    def quantised(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(weight, bias) as the integer network sees them (as floats), and the exponent e."""
        e = self.exponent()
        w = torch.clamp(round_ste(self.weight * self.mask * 2.0**e), -ACT_MAX, ACT_MAX)
        b = round_ste(self.bias * 2.0 ** (e + self.in_shift))
        return w / 2.0**e, b / 2.0 ** (e + self.in_shift), e

    def forward(self, x: torch.Tensor, qat: bool) -> torch.Tensor:
        if qat:
            w, b, _ = self.quantised()
        else:
            w, b = self.weight * self.mask, self.bias
        return F.conv2d(x, w, b, padding=self.pad)


class CausalNet(nn.Module):
    """`inner`: 0 for blocks h + conv3x3(h); 1 for h + conv1x1(act(conv3x3(h))).

    Without the inner layer a "residual" block is clip(h + W h): a plain conv layer with an
    identity-shaped start, so depth adds little. The 1×1 inner layer gives each block its own
    nonlinearity at the cost of one pointwise matmul, and being pointwise it adds no neighbours
    to the wavefront decoder's cache.
    """

    def __init__(self, channels: int = 32, blocks: int = 5, inner: int = 0):
        super().__init__()
        self.channels = channels
        self.inner = inner
        self.first = QConv(N_FEATURES, channels, 7, causal_mask(7, False), FEATURE_SHIFT)
        self.blocks = nn.ModuleList(
            QConv(channels, channels, 3, causal_mask(3, True), ACT_SHIFT) for _ in range(blocks)
        )
        self.inners = nn.ModuleList(
            QConv(channels, channels, 1, None, ACT_SHIFT) for _ in range(blocks if inner else 0)
        )
        self.hidden = QConv(channels, channels, 1, None, ACT_SHIFT)
        self.head = QConv(channels, 2, 1, None, ACT_SHIFT)
        nn.init.zeros_(self.head.weight)

    def _act(self, y: torch.Tensor, qat: bool) -> torch.Tensor:
        """Floor to the activation grid (QAT only) and clip to the int8 range."""
        if qat:
            y = floor_ste(y * 2.0**ACT_SHIFT) / 2.0**ACT_SHIFT
        return torch.clamp(y, 0.0, ACT_MAX / 2.0**ACT_SHIFT)

    def forward(self, feats: torch.Tensor, qat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: (B, 4, H, W) integer features. Returns (mean offset, log2 scale) in units of d.

        In QAT mode the mean offset is still real-valued (the codec floors mean·d, which needs
        d, applied in `predict`) and the log2 scale is already on the 1/8-octave grid.
        """
        h = self._act(self.first(feats / 2.0**FEATURE_SHIFT, qat), qat)
        for i, block in enumerate(self.blocks):
            y = block(h, qat)
            if self.inner:
                y = self.inners[i](self._act(y, qat), qat)
            if qat:
                y = floor_ste(y * 2.0**ACT_SHIFT) / 2.0**ACT_SHIFT
            h = torch.clamp(h + y, 0.0, ACT_MAX / 2.0**ACT_SHIFT)
        h = self._act(self.hidden(h, qat), qat)
        out = self.head(h, qat)
        mean, log_scale = out[:, 0], out[:, 1]
        if qat:
            log_scale = floor_ste(log_scale * SCALE_STEPS) / SCALE_STEPS
        return mean, log_scale

    def layers(self) -> list[QConv]:
        """In the integer network's order: each block's 3×3 layer then its 1×1 inner layer."""
        inner = [[b, self.inners[i]] if self.inner else [b] for i, b in enumerate(self.blocks)]
        return [self.first, *(layer for pair in inner for layer in pair), self.hidden, self.head]

"""The image layer of an encoder on grey levels in int8 arithmetic, for the cache refresh.

A refresh encodes every exemplar, and in the MLP encoders ~70% of its multiply-adds are
the first layer, the one that reads the image. Exemplar images are kept as uint8 levels
(level p is p / 255: common/levels.py), so that layer's input is exactly integer: W (p /
255) + b = (W p) / 255 + b. Its weights are split into two int8 terms per output row,
W = s1 Q1 + s2 Q2 + R (Q2 quantizes what Q1 left over, so |R| <= max|W_row| / 64,516), and
Q p is an int32 matrix product (torch._int_mm, exact in any summation order). On a CPU
with int8 dot-product instructions (x86 VNNI) that product runs several times faster than
float32's (the encode's figures: bench/README.md, "Refresh to served"). The means differ from
float32's by ~1e-4 (the nearest other exemplar is ~1.4 away on MNIST): below what a
refresh one step later would move them, and the same in every placement and world size,
since integer sums do not depend on how the rows are split.

Only the cache refresh uses it; evaluation encodes in float32 (objective.encode_means on
float images).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn


@functools.cache
def int8_dot_products() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI), which
    torch._int_mm uses; elsewhere it is no faster than float32 and the refresh stays
    float32. Read from /proc/cpuinfo (Linux); False where it cannot be read."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) is not None


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (Q [out, in] int8, scale [out]) with w ~= scale[:, None] Q."""
    scale = w.abs().amax(1).clamp_min(torch.finfo(w.dtype).tiny) / 127.0
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class LevelsLinear:
    """linear(levels / 255) for uint8 levels [B, in] -> float32 [B, out], in int8 arithmetic.

    The levels enter as p - 128 (int8), and 128 Q 1 is added back, so the int32 sums are
    those of Q p exactly. Built from the layer's current weights: build one per refresh.
    """

    def __init__(self, linear: nn.Linear):
        w = linear.weight.detach().float().cpu()
        q1, s1 = _int8_rows(w)
        q2, s2 = _int8_rows(w - s1[:, None] * q1.float())
        # (Q^T for _int_mm, the scale of its sums, 128 Q 1: what centring took away)
        self.terms = [(q.t().contiguous(), s / 255.0, 128.0 * q.float().sum(1))
                      for q, s in ((q1, s1), (q2, s2))]
        self.bias = (linear.bias.detach().float().cpu() if linear.bias is not None
                     else torch.zeros(w.shape[0]))

    def __call__(self, levels: torch.Tensor) -> torch.Tensor:
        if levels.dtype != torch.uint8 or levels.dim() != 2:
            raise ValueError(f"LevelsLinear takes uint8 levels [B, D], got {levels.dtype} "
                             f"{tuple(levels.shape)}")
        centred = levels.bitwise_xor(128).view(torch.int8)  # p - 128, as int8
        out = self.bias.expand(levels.shape[0], -1).clone()
        for q_t, scale, offset in self.terms:
            out.addcmul_(torch._int_mm(centred, q_t).float().add_(offset), scale)
        return out

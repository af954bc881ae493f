"""The refresh's int8 image layer (core/int8.py), against float64 brute force, and its
float32 fallback on a CPU without int8 dot products."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exvae_dist.common.levels import exact_levels, from_bytes
from exvae_dist.core import int8, objective
from exvae_dist.core.models import MLPVAE
from exvae_dist.core.models.convhvae import ConvHVAE
from exvae_dist.core.models.hvae import HVAE
from exvae_dist.core.objective import encode_means

needs_int8 = pytest.mark.skipif(not int8.int8_dot_products(),
                                 reason="this CPU has no int8 dot products (VNNI)")


def _levels(n: int, d: int = 784, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n, d), dtype=torch.uint8, generator=g)
    b[torch.rand(n, d, generator=g) < 0.7] = 0  # mostly background, as digits are
    return b


def test_levels_linear_matches_float64_within_its_split_bound():
    torch.manual_seed(0)
    linear = torch.nn.Linear(784, 600)
    linear.weight.data *= torch.linspace(0.1, 10, 600)[:, None]  # rows of unequal scale
    p = _levels(300)
    got = int8.LevelsLinear(linear)(p).double()
    w, bias = linear.weight.double(), linear.bias.double()
    want = (p.double() / 255) @ w.t() + bias
    # W = s1 Q1 + s2 Q2 + R with |R| <= max|W_row| / (2 * 127 * 2 * 127): the error of a
    # row is at most that times the sum of the image's levels, plus float32 rounding
    bound = w.abs().amax(1) / 64516 * (p.double() / 255).sum(1, keepdim=True) \
        + 1e-6 * want.abs() + 1e-6
    assert ((got - want).abs() <= bound).all()
    # one int8 term alone is ~250x off that bound: the second term is what makes it
    one = int8.LevelsLinear(linear)
    one.terms = one.terms[:1]
    assert ((one(p).double() - want).abs() > bound).any()


@needs_int8
@pytest.mark.parametrize("arch", [MLPVAE, HVAE])
def test_encode_means_of_levels_is_float64_within_1e_4(arch):
    torch.manual_seed(1)
    net = arch(x_dim=784, hidden=300, z_dim=40).eval()
    p = _levels(500, seed=2)
    got = encode_means(net, p, batch_size=128)  # several batches, the last one short
    want = encode_means(net.double(), p.double() / 255, dtype=torch.float64)
    err = (got.double() - want).norm(dim=1)
    assert err.max() < 1e-3 and err.mean() < 1e-4, (err.max(), err.mean())


def test_encode_means_of_levels_falls_back_to_float32(monkeypatch):
    """No int8 dot products (or an encoder that does not start with a linear layer): the
    levels are encoded as p / 255 in float32, bit for bit as float images are."""
    torch.manual_seed(3)
    p = _levels(64, seed=4)
    net = MLPVAE(x_dim=784, hidden=300, z_dim=40).eval()
    monkeypatch.setattr(objective, "int8_dot_products", lambda: False)
    assert torch.equal(encode_means(net, p), encode_means(net, from_bytes(p)))
    monkeypatch.undo()
    conv = ConvHVAE(image_shape=(1, 28, 28), hidden=32, z_dim=8).eval()
    assert conv.image_linear is None
    assert torch.equal(encode_means(conv, p), encode_means(conv, from_bytes(p)))


def test_int8_dot_products_reads_the_cpu_flags(monkeypatch, tmp_path):
    detect = int8.int8_dot_products.__wrapped__  # not the cached answer
    for flags, has in (("fpu sse avx2 avx512f avx512bw", False),
                       ("fpu avx512f avx512_vnni", True), ("fpu avx_vnni avx2", True)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(int8, "Path", lambda _: cpuinfo)
        assert detect() is has
    monkeypatch.setattr(int8, "Path", lambda _: tmp_path / "missing")
    assert detect() is False


def test_exact_levels_only_for_255_levels():
    b = np.arange(256, dtype=np.uint8).reshape(2, 128)
    x = from_bytes(b).numpy()
    assert np.array_equal(exact_levels(x), b)
    x[0, 5] += 1e-3  # not a level: the float images are kept
    assert exact_levels(x) is None

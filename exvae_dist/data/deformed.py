"""Deformed MNIST: as many digits as asked for, from the 50,000 MNIST training digits.

Row i of the set is training digit i mod 50,000 (with its label) under a random affine map
(rotation, anisotropic scale, shear, translation) composed with a smooth random elastic
field, the idea behind infinite MNIST / MNIST8M (Loosli, Canu & Bottou 2007). Every random
number of row i is a keyed hash of (seed, i), so any row can be regenerated on its own, in
any order, in any process: `deformed_rows(base, labels, np.array([i]), seed)`. Rows
0..49,999 are the undeformed originals, so `deformed-mnist:50000` is the MNIST training set.

Pure numpy: a batch of R rows is a handful of [R, 28, 28] array operations (bilinear
resampling as flat gathers, checked against scipy.ndimage.map_coordinates in the tests).
"""

from __future__ import annotations

import numpy as np

from ..core.keyed import DEFORM, derive_key, keyed_normal, keyed_uniform

# Deformation ranges (uniform unless noted); mild enough that digits stay legible.
MAX_ROTATION_DEG = 15.0
MAX_LOG_SCALE = 0.12  # per axis, log of the scale factor
MAX_SHEAR = 0.25
MAX_SHIFT_PX = 2.0
ELASTIC_GRID = 4  # elastic displacements drawn on a 4 x 4 grid, then smoothly interpolated
ELASTIC_STD_PX = 1.2  # normal std of each grid displacement, in pixels
_N_UNIFORM = 6  # rotation, log scale x / y, shear, shift x / y


def _smooth_interpolator(size: int, grid: int) -> np.ndarray:
    """[size, grid] Gaussian-RBF weights (rows sum to 1) from grid nodes to pixel rows."""
    nodes = np.linspace(0, size - 1, grid)
    spacing = nodes[1] - nodes[0]
    w = np.exp(-0.5 * ((np.arange(size)[:, None] - nodes[None, :]) / spacing) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def deformed_rows(base: np.ndarray, base_labels: np.ndarray, rows: np.ndarray,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` (int64 [R]) of the deformed set: (uint8 [R, H, W] images, int64 [R] labels).

    base: uint8 [B0, H, W] source digits; base_labels: [B0]. Row i < B0 is base[i] as is.
    """
    base = np.asarray(base)
    rows = np.asarray(rows, dtype=np.int64)
    if base.ndim != 3 or base.dtype != np.uint8:
        raise ValueError(f"base must be uint8 [B0, H, W], got {base.dtype} {base.shape}")
    if rows.size and rows.min() < 0:
        raise ValueError("row indices must be non-negative")
    b0, h, w = base.shape
    src = rows % b0
    out = base[src].copy()
    deform = rows >= b0
    if deform.any():
        out[deform] = _deform(base[src[deform]], rows[deform], seed)
    return out, np.asarray(base_labels)[src].astype(np.int64)


def _deform(images: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    r, h, w = images.shape
    key = derive_key(seed, DEFORM)
    u = keyed_uniform(key, rows[:, None].astype(np.uint64) * np.uint64(_N_UNIFORM)
                      + np.arange(_N_UNIFORM, dtype=np.uint64)) * 2 - 1  # [R, 6] in [-1, 1)
    theta = np.deg2rad(MAX_ROTATION_DEG) * u[:, 0]
    sx, sy = np.exp(MAX_LOG_SCALE * u[:, 1]), np.exp(MAX_LOG_SCALE * u[:, 2])
    shear = MAX_SHEAR * u[:, 3]
    tx, ty = MAX_SHIFT_PX * u[:, 4], MAX_SHIFT_PX * u[:, 5]
    cos, sin = np.cos(theta), np.sin(theta)
    # A = rotation @ shear @ scale, mapping output offsets to input offsets: [R, 2, 2]
    a00 = cos * sx
    a01 = (cos * shear - sin) * sy
    a10 = sin * sx
    a11 = (sin * shear + cos) * sy

    g = ELASTIC_GRID
    n_el = 2 * g * g
    eps = keyed_normal(key, (rows[:, None].astype(np.uint64) * np.uint64(n_el)
                             + np.arange(n_el, dtype=np.uint64)) + np.uint64(1 << 62))
    eps = eps.reshape(r, 2, g, g) * ELASTIC_STD_PX
    # [R, 2, H, W] smooth displacement: one GEMM with the Kronecker product of the two
    # interpolators (a batched wy @ eps @ wx.T of 4 x 4 matrices costs 50x more here)
    kron = np.kron(_smooth_interpolator(h, g), _smooth_interpolator(w, g)).T  # [g*g, H*W]
    field = (eps.reshape(r * 2, g * g) @ kron).reshape(r, 2, h, w)

    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) - cy,
                         np.arange(w, dtype=np.float32) - cx, indexing="ij")
    a00, a01, a10, a11, tx, ty = (v.astype(np.float32) for v in (a00, a01, a10, a11, tx, ty))
    field = field.astype(np.float32)
    src_y = cy + a00[:, None, None] * yy + a01[:, None, None] * xx + ty[:, None, None]
    src_x = cx + a10[:, None, None] * yy + a11[:, None, None] * xx + tx[:, None, None]
    src_y += field[:, 0]
    src_x += field[:, 1]
    return np.clip(np.rint(_bilinear(images, src_y, src_x)), 0, 255).astype(np.uint8)


def _bilinear(images: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """float32 [R, H, W]: images[r] sampled at (src_y, src_x), bilinear, zero outside.

    The same values as scipy.ndimage.map_coordinates(order=1, mode="grid-constant") on each 2-D
    image, but done as four flat gathers: map_coordinates over the [R, H, W] stack
    interpolates along the batch axis too (8 corners, not 4) and took 2.1 s per 8192 rows.
    """
    r, h, w = images.shape
    # zero-pad (one pixel before, two after) so that all four corners of any clipped sample
    # are valid indices: outside the image the zeros fade in smoothly (scipy's
    # mode="grid-constant")
    padded = np.zeros((r, h + 3, w + 3), np.float32)
    padded[:, 1:h + 1, 1:w + 1] = images
    flat = padded.reshape(-1)
    src_y = np.clip(src_y + 1, 0, h + 1).astype(np.float32)
    src_x = np.clip(src_x + 1, 0, w + 1).astype(np.float32)
    y0, x0 = np.floor(src_y), np.floor(src_x)
    fy, fx = src_y - y0, src_x - x0
    stride = w + 3
    idx = (np.arange(r, dtype=np.int32) * ((h + 3) * stride))[:, None, None] \
        + y0.astype(np.int32) * stride + x0.astype(np.int32)
    top = flat[idx] * (1 - fx) + flat[idx + 1] * fx
    bottom = flat[idx + stride] * (1 - fx) + flat[idx + stride + 1] * fx
    return top * (1 - fy) + bottom * fy


__all__ = ["deformed_rows"]

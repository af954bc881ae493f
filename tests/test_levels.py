"""common/levels.py: the one uint8 <-> float32 conversion of grey levels."""

import numpy as np
import torch

from exvae_dist.common.levels import from_bytes, to_bytes


def test_every_level_reads_as_the_readers_float32_division_and_writes_back():
    b = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = from_bytes(b)
    assert x.dtype == torch.float32
    # the dataset readers' form, computed by numpy: bit-identical, not merely close
    np.testing.assert_array_equal(x.numpy(), b.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(to_bytes(x.numpy()), b)
    ro = b.copy()
    ro.flags.writeable = False  # an array from the object store
    np.testing.assert_array_equal(from_bytes(ro).numpy(), x.numpy())


def test_floats_round_to_the_nearest_level_and_clip():
    x = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(to_bytes(x), [0, 0, 0, 1, 128, 255, 255])
    u = np.array([3, 200], dtype=np.uint8)
    assert to_bytes(u) is u  # uint8 passes as it is

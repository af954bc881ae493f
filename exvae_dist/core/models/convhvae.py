"""The convolutional two-level HVAE of the VampPrior paper (Tomczak & Welling 2018).

Layer sizes are those of the paper's convHVAE (2 levels), for 28x28 images:

    q(z2 | x)      gated convs (channels, kernel, stride): (32,7,1) (32,3,2) (64,5,1) (64,3,2) (6,3,1)
                   -> 6 x 7 x 7 = 294 features -> Gaussian head
    q(z1 | x, z2)  x: gated convs (32,3,1) (32,3,2) (64,3,1) (64,3,2) (6,3,1) -> 294 features;
                   z2 -> gated dense 294; joined -> gated dense `hidden` -> Gaussian head
    p(z1 | z2)     gated dense z2 -> hidden -> hidden, Gaussian head (shared with the MLP HVAE)
    p(x | z1, z2)  z1 -> gated hidden, z2 -> gated hidden, joined -> gated dense to one image,
                   reshaped to C x H x W, four gated 3x3 convs of 64 channels at full
                   resolution, and a 1x1 conv to the Bernoulli logits

"Same" padding throughout, so stride-2 layers give ceil(H/2); the feature width 6 x H/4 x W/4
follows the image shape. The full-resolution decoder convs dominate the cost (about 0.2 GFLOP
per image, about 1 s per training step of 100 images on 2 idle CPU cores; `decoder_channels`
below 64 trades fidelity to the paper for speed). `decode_chunk` bounds how many images one
decoder call holds in memory, which matters for importance sampling with hundreds of samples
per image. x arrives flat [..., D]
and is reshaped to image_shape here; leading sample axes are flattened for the convolutions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .hvae import TwoLevelVAE
from .layers import GatedConv2d, GatedDense, GaussianHead, he_init

FEATURE_CHANNELS = 6  # channels of the last encoder conv, as in the paper


class ConvHVAE(TwoLevelVAE):
    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), hidden: int = 300,
                 z_dim: int = 40, logvar_min: float = -6.0, logvar_max: float = 2.0,
                 decoder_channels: int = 64, decode_chunk: int = 1024, likelihood=None):
        super().__init__(hidden, z_dim, logvar_min, logvar_max, likelihood)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.x_dim = math.prod(self.image_shape)
        self.decode_chunk = decode_chunk
        c, h, w = self.image_shape
        feat = FEATURE_CHANNELS * math.ceil(math.ceil(h / 2) / 2) * math.ceil(math.ceil(w / 2) / 2)

        self.q_z2_convs = nn.Sequential(
            GatedConv2d(c, 32, 7, 1, 3), GatedConv2d(32, 32, 3, 2, 1), GatedConv2d(32, 64, 5, 1, 2),
            GatedConv2d(64, 64, 3, 2, 1), GatedConv2d(64, FEATURE_CHANNELS, 3, 1, 1))
        self.q_z2_head = GaussianHead(feat, z_dim, logvar_min, logvar_max)

        self.q_z1_x = nn.Sequential(
            GatedConv2d(c, 32, 3, 1, 1), GatedConv2d(32, 32, 3, 2, 1), GatedConv2d(32, 64, 3, 1, 1),
            GatedConv2d(64, 64, 3, 2, 1), GatedConv2d(64, FEATURE_CHANNELS, 3, 1, 1))
        self.q_z1_z2 = GatedDense(z_dim, feat)
        self.q_z1_joint = GatedDense(2 * feat, hidden)
        self.q_z1_head = GaussianHead(hidden, z_dim, logvar_min, logvar_max)

        self.p_x_z1 = GatedDense(z_dim, hidden)
        self.p_x_z2 = GatedDense(z_dim, hidden)
        self.p_x_to_image = GatedDense(2 * hidden, self.x_dim)
        self.p_x_convs = nn.Sequential(
            GatedConv2d(c, decoder_channels, 3, 1, 1),
            *[GatedConv2d(decoder_channels, decoder_channels, 3, 1, 1) for _ in range(3)],
            # parameter-major output channels: channel p * c + ch is parameter p of channel ch
            nn.Conv2d(decoder_channels, c * self.likelihood.params_per_dim, 1))
        he_init(self)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] flat -> [B, C, H, W]."""
        if x.shape[-1] != self.x_dim:
            raise ValueError(f"ConvHVAE expects flat images of {self.x_dim} values "
                             f"(image_shape={self.image_shape}), got x of shape {tuple(x.shape)}; "
                             f"build the model with the image_shape of the data")
        return x.reshape(-1, *self.image_shape)

    def encode_top(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.q_z2_convs(self._images(x)).flatten(1)
        return self.q_z2_head(h.reshape(x.shape[:-1] + h.shape[-1:]))

    def posterior_z1(self, x, z2):
        # The conv x branch runs once per image and is shared by all S samples of z2.
        hx = self.q_z1_x(self._images(x)).flatten(1).reshape(x.shape[:-1] + (-1,))
        hz = self.q_z1_z2(z2)
        return self.q_z1_head(self.q_z1_joint(torch.cat([hx.expand_as(hz), hz], dim=-1)))

    def decoder_logits(self, z1, z2):
        h = self.p_x_to_image(torch.cat([self.p_x_z1(z1), self.p_x_z2(z2)], dim=-1))
        lead = h.shape[:-1]
        images = h.reshape(-1, *self.image_shape)
        # Chunked so that, without gradients, S x B images (e.g. 500 x 10 in importance
        # sampling) never hold 64-channel full-resolution activations all at once.
        out = [self.p_x_convs(images[i:i + self.decode_chunk])
               for i in range(0, max(images.shape[0], 1), self.decode_chunk)]
        return torch.cat(out).reshape(lead + (self.x_dim * self.likelihood.params_per_dim,))

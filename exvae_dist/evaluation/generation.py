"""Drawing images from a trained model, recording where each came from (commands/generate.py
is the command line):

    exemplar prior: n ~ Uniform(exemplars) (or the ids of --exemplars, in turn),
                    z ~ Normal(mu_phi(x_n), s^2 I), x ~ p(x | z) or its mean
    VampPrior:      the pseudo-input k each z was drawn around (labels -1)
    Gaussian:       no component (ids and labels -1)

FILE.npz holds `images` uint8 [n, C, H, W] (levels 0..255; Bernoulli draws are 0 / 255),
`exemplar_ids` int64 [n] (rows of the exemplar set in use, eval.exemplars), `labels` int64
[n] (the class of that exemplar, -1 when unknown), `image_shape`, and a JSON `info` string.
`augment` draws its exemplar-conditioned samples with the same `draw_images`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common.atomic import atomic_path
from ..common.levels import to_bytes
from ..core.objective import VAEWithPrior
from ..core.sampling import sample_top_with_sources

log = logging.getLogger(__name__)

HOW = ("mean", "sample")


@torch.no_grad()
def draw_images(model: VAEWithPrior, n: int, centres: Optional[torch.Tensor],
                exemplar_ids: Optional[torch.Tensor], generator: torch.Generator,
                how: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """n images and the component each came from: (images [n, D] in [0, 1], ids [n]).

    how: "mean" (decoder means, e.g. pixel probabilities) or "sample" (x ~ p(x|z)).
    exemplar_ids [n] fixes the exemplar of each draw (exemplar prior only).
    """
    if how not in HOW:
        raise ValueError(f"how={how!r} is not one of {', '.join(HOW)}")
    z, ids = sample_top_with_sources(model, n, centres, exemplar_ids, generator)
    params = model.net.decoder_params(z)
    lik = model.net.likelihood
    images = lik.mean(params) if how == "mean" else lik.sample(params.cpu(), generator)
    return images, ids


def generate(model: VAEWithPrior, exemplar_set, n: int, exemplar_ids: Optional[list[int]] = None,
             seed: int = 0, how: str = "mean", batch_size: int = 1000,
             progress: bool = True) -> dict:
    """n draws in batches; returns {"images" float32 [n, D], "exemplar_ids" [n], "labels" [n]}.

    exemplar_set: exemplars.ExemplarSet (its latents are the prior's centres);
    exemplar_ids: condition on these exemplars, used in turn (None: uniform over all).
    """
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    centres = None
    if model.prior_kind == "exemplar":
        centres = torch.from_numpy(exemplar_set.latents)
    elif exemplar_ids is not None:
        raise ValueError(f"--exemplars needs the exemplar prior; this model has a "
                         f"{model.prior_kind} prior")
    fixed = None
    if exemplar_ids is not None:
        ids = np.asarray(exemplar_ids, dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= len(centres):
            raise ValueError(f"--exemplars ids must lie in 0..{len(centres) - 1} (the exemplar "
                             f"set {exemplar_set.description!r}), got {exemplar_ids[:5]}...")
        fixed = torch.from_numpy(np.resize(ids, n))
    gen = torch.Generator().manual_seed(seed)
    images, sources = [], []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="generate", leave=False, disable=None, dynamic_ncols=True)
    for start in starts:
        m = min(batch_size, n - start)
        x, ids = draw_images(model, m, centres, None if fixed is None else fixed[start:start + m],
                             gen, how)
        images.append(x.cpu().float())
        sources.append(ids.cpu())
    ids = torch.cat(sources).numpy()
    labels = np.full(n, -1, dtype=np.int64)
    if model.prior_kind == "exemplar" and exemplar_set.labels is not None:
        labels = np.asarray(exemplar_set.labels, dtype=np.int64)[ids]
    return {"images": torch.cat(images).numpy(), "exemplar_ids": ids.astype(np.int64),
            "labels": labels}


def save_npz(path: Path, out: dict, image_shape, info: dict) -> Path:
    """The generated images (uint8 levels, [n, C, H, W]), ids and labels, written atomically."""
    path = Path(path)
    images = to_bytes(out["images"])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images.reshape(len(images), *image_shape),
                            exemplar_ids=out["exemplar_ids"], labels=out["labels"],
                            image_shape=np.asarray(image_shape), info=np.asarray(json.dumps(info)))
    return path

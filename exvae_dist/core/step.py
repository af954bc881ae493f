"""One training step, shared by the one-process trainer and the Ray Train workers.

    batch ids -> images -> [RAT: encode batch (no grad) -> search -> candidates]
              -> ONE forward of VAEWithPrior over batch + exemplars -> backward -> step

The neighbour search sits behind the small `NeighbourSearch` interface: an in-memory latent
cache (retrieval/exact.py) in the one-process trainer, the FAISS index service on Ray.

The exemplar subset S of a step is a keyed function of (seed, global step, id)
(retrieval/keyed.py): the same on every rank and after a resume, with no random state to save
(METHOD.md section 3 fixes it per minibatch), and a step asks it only about the ids it touches,
so nothing of size N is drawn per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from .objective import VAEWithPrior, encode_means
from . import keyed
from .candidates import assemble_candidates, query_depth, subset_size


class NeighbourSearch(Protocol):
    """Nearest cached exemplar means of each query, over ALL N exemplars. A search whose
    `searches_subsets` is True also takes `among=` row ids [M] and searches only those
    (TorchExactSearch: the step's subset S, which is cheaper and exact)."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """queries: [B, d] float32 -> (ids [B, k] int64 nearest first, index version)."""


@dataclass
class PriorBatch:
    """The prior's components for one minibatch (see VAEWithPrior.forward)."""

    exemplars: Optional[torch.Tensor] = None  # [C, D] images re-encoded with gradients
    exclude: Optional[torch.Tensor] = None  # [B, C] bool, leave-one-out
    log_norm: Optional[torch.Tensor] = None  # [B] normalizer; None = number kept
    n_candidates: int = 0
    n_short: int = 0  # rows with fewer than k retrieved survivors (RAT)
    index_version: int = -1
    ids: Optional[np.ndarray] = None  # [C] exemplar ids of `exemplars`
    encoded: Optional[torch.Tensor] = None  # [C, d] their means as this step encoded them


class PriorSampler:
    """Chooses each minibatch's exemplars: the exact M-subset, or RAT's retrieved union.

    train_images: [N, D] float images of the exemplars as the prior encodes them (grey levels
    for dynamically binarized data, as the reference code does); indexed by exemplar ids.
    seed: the run's seed; the subset S of global step t holds exactly M exemplars, each with
    probability M/N: keyed.coins_for(ids, t, M, N, seed) (keyed.subset_for lists all of it).
    """

    def __init__(self, prior_cfg, train_images: torch.Tensor,
                 search: Optional[NeighbourSearch] = None, seed: int = 0):
        self.cfg = prior_cfg
        self.images = train_images
        self.n = train_images.shape[0]
        self.m = subset_size(self.n, prior_cfg.subsample)
        self.search = search
        self.seed = seed
        if prior_cfg.kind == "exemplar" and prior_cfg.rat and search is None:
            raise ValueError("RAT needs a neighbour search (TorchExactSearch or the index service)")

    def __call__(self, model: VAEWithPrior, batch_ids: np.ndarray, x: torch.Tensor,
                 step: int) -> PriorBatch:
        """The prior's components for this rank's rows `batch_ids` of global step `step`."""
        if self.cfg.kind != "exemplar":
            return PriorBatch()
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        if self.cfg.rat:
            return self._retrieved(model, batch_ids, x, step)
        return self._exact_subset(batch_ids, x, step)

    def _exact_subset(self, batch_ids: np.ndarray, x: torch.Tensor, step: int) -> PriorBatch:
        subset = keyed.subset_for(step, self.m, self.n, self.seed)
        exclude = torch.from_numpy(subset[None, :] == batch_ids[:, None]).to(x.device)
        return PriorBatch(exemplars=self.images[torch.from_numpy(subset)].to(x.device),
                          exclude=exclude, n_candidates=len(subset), ids=subset)

    def _retrieved(self, model: VAEWithPrior, batch_ids: np.ndarray, x: torch.Tensor,
                   step: int) -> PriorBatch:
        with torch.no_grad():
            queries = model.net.encode_top(x)[0].float().cpu().numpy()
        n, m, seed = self.n, self.m, self.seed
        subset = None
        if getattr(self.search, "searches_subsets", False):
            # the k nearest of S less the element itself are among the k + 1 nearest of S
            subset = keyed.subset_for(step, m, n, seed) if m < n else None  # None: all N
            ids, version = self.search.search(queries, self.cfg.k + 1, among=subset)
        else:  # an index over all N: search k' deep, assemble_candidates keeps S's members
            ids, version = self.search.search(
                queries, query_depth(self.cfg.k, n, m, self.cfg.safety))

        def coins(rows: np.ndarray) -> np.ndarray:  # this step's M/N coins of those ids only
            if subset is not None:  # S is at hand (sorted): look the ids up, no hashing
                at = np.minimum(np.searchsorted(subset, rows), len(subset) - 1)
                return subset[at] == rows
            return keyed.coins_for(rows, step, m, n, seed)

        cand = assemble_candidates(ids, batch_ids, coins, self.cfg.k, n, subset_size=m)
        exclude = torch.from_numpy(cand.exclude).to(x.device)
        log_norm = (torch.from_numpy(cand.log_norm).to(x.device, x.dtype)
                    if self.cfg.normalizer == "subset" else None)
        return PriorBatch(exemplars=self.images[torch.from_numpy(cand.ids)].to(x.device),
                          exclude=exclude, log_norm=log_norm, n_candidates=len(cand.ids),
                          n_short=cand.n_short, index_version=version, ids=cand.ids)

def normalize_gradients(params) -> None:
    """Divides each parameter's gradient by its L2 norm (the reference AdamNormGrad)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(norms, 1e-7)
        torch._foreach_div_(grads, norms)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               prior: PriorBatch, beta: float, normalize_grads: bool = True) -> dict:
    """One optimizer step; `model` is a VAEWithPrior or its DDP wrapper. Returns float metrics."""
    optimizer.zero_grad(set_to_none=True)
    out = model(x, beta, exemplars=prior.exemplars, exclude=prior.exclude, log_norm=prior.log_norm)
    # one device sync per step for the check and the metrics together
    loss, log_px, kl = torch.stack([out.loss.detach(), out.log_px.detach().mean(),
                                    out.kl.detach().mean()]).tolist()
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss} (beta={beta}); lower train.lr or check the data "
            "(all-zero images, NaNs)")
    prior.encoded = out.centres  # the fresh means, for a cache that takes them (write_back)
    out.loss.backward()
    if normalize_grads:
        normalize_gradients(model.parameters())
    optimizer.step()
    return {"loss": loss, "log_px": log_px, "kl": kl, "candidates": prior.n_candidates,
            "short_rows": prior.n_short, "index_version": prior.index_version,
            "grad_candidates": out.grad_exemplars}


@torch.no_grad()
def validation_elbo(model: VAEWithPrior, x: torch.Tensor, centres: Optional[torch.Tensor],
                    batch_size: int = 250, samples: int = 1) -> dict:
    """Mean ELBO (beta = 1), log p(x|z) and KL over x [N, D], each averaged over `samples`
    posterior draws per image (eval.validation_samples in training).

    Exemplar prior: `centres` = the encoder means of ALL training exemplars (normalizer N, no
    leave-one-out: validation images are not exemplars): a tensor, or priors.CentreBlocks
    read from the store a block at a time, then scored against all of x in one pass (each
    block is read once per pass, not once per batch).
    """
    if centres is not None and not isinstance(centres, torch.Tensor):
        batch_size = max(1, x.shape[0])
    sums = {"elbo": 0.0, "log_px": 0.0, "kl": 0.0}
    for start in range(0, x.shape[0], batch_size):
        for _ in range(samples):
            out = model(x[start:start + batch_size], 1.0, centres=centres)
            sums["elbo"] += out.elbo.sum().item()
            sums["log_px"] += out.log_px.sum().item()
            sums["kl"] += out.kl.sum().item()
    return {k: v / max(1, x.shape[0] * samples) for k, v in sums.items()}


def exemplar_centres(model: VAEWithPrior, images: torch.Tensor) -> Optional[torch.Tensor]:
    """Encoder means of all exemplars (no gradients) when the prior needs them, else None."""
    if model.prior_kind != "exemplar":
        return None
    return encode_means(model.net, images)


def log_var_value(model: VAEWithPrior) -> float:
    """The exemplar prior's learned log-variance lambda, or NaN for other priors."""
    return model.prior.log_var.item() if model.prior_kind == "exemplar" else math.nan

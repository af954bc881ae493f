"""One training step, shared by the one-process trainer and the Ray Train workers.

    batch ids -> images -> [RAT: encode batch (no grad) -> search -> candidates]
              -> ONE forward of VAEWithPrior over batch + exemplars -> backward -> step

The neighbour search sits behind the small `NeighbourSearch` interface: `TorchExactSearch`
here (an in-memory latent cache), the FAISS index service in the distributed trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch

from .objective import VAEWithPrior, encode_means
from .retrieval.candidates import assemble_candidates, draw_coins, query_depth


class NeighbourSearch(Protocol):
    """Nearest cached exemplar means of each query, over ALL N exemplars."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """queries: [B, d] float32 -> (ids [B, k] int64 nearest first, index version)."""


class TorchExactSearch:
    """kNN over an in-memory latent cache in torch: the core's neighbour search (no FAISS, no
    Ray). Ranks by ||c||^2 / 2 - q.c (the squared distance less a per-query constant), in
    blocks of exemplars so memory stays bounded.

    precision="bfloat16" scores with a bfloat16 matmul (with d=40 a float32 matmul runs far
    below peak on CPU; AMX bfloat16 is ~8x faster), keeps `prefilter * k` per query and
    re-ranks those by exact float32 distance: approximate only where a bfloat16 rounding
    error exceeds the gap to the prefilter's cut-off.
    """

    def __init__(self, block: int = 65536, precision: str = "float32", prefilter: int = 4):
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
        self.block = block
        self.precision = precision
        self.prefilter = prefilter
        self.latents: Optional[torch.Tensor] = None
        self.version = -1

    def update(self, latents: torch.Tensor) -> int:
        """Replaces the cache with latents [N, d]; returns the new version number."""
        self.latents = latents.detach().float().contiguous()
        self._half_sq = 0.5 * (self.latents * self.latents).sum(1)
        self._low_t = (self.latents.t().contiguous().bfloat16()
                       if self.precision == "bfloat16" else None)
        self.version += 1
        return self.version

    def _search_bfloat16(self, q: torch.Tensor, k: int) -> torch.Tensor:
        scores = self._half_sq[None, :] - (q.bfloat16() @ self._low_t).float()
        wide = min(self.latents.shape[0], self.prefilter * k)
        cand = torch.topk(scores, wide, dim=1, largest=False, sorted=False).indices
        d2 = (q[:, None, :] - self.latents[cand]).pow(2).sum(-1)
        pos = torch.topk(d2, k, dim=1, largest=False, sorted=True).indices
        return torch.gather(cand, 1, pos)

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        if self.latents is None:
            raise RuntimeError("search before the exemplar cache was filled: call update() first")
        q = torch.as_tensor(queries, dtype=torch.float32).to(self.latents.device)
        if q.dim() != 2 or q.shape[1] != self.latents.shape[1]:
            raise ValueError(f"queries must be [B, {self.latents.shape[1]}], got {tuple(q.shape)}")
        k = min(k, self.latents.shape[0])
        if self._low_t is not None:
            return self._search_bfloat16(q, k).cpu().numpy().astype(np.int64), self.version
        best_d, best_i = None, None
        for start in range(0, self.latents.shape[0], self.block):
            block = slice(start, start + self.block)
            scores = torch.addmm(self._half_sq[None, block], q, self.latents[block].t(), alpha=-1.0)
            d, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=False, sorted=True)
            i = i + start
            if best_d is None:
                best_d, best_i = d, i
            else:
                cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                best_d, pos = torch.topk(cat_d, k, dim=1, largest=False, sorted=True)
                best_i = torch.gather(cat_i, 1, pos)
        return best_i.cpu().numpy().astype(np.int64), self.version


@dataclass
class PriorBatch:
    """The prior's components for one minibatch (see VAEWithPrior.forward)."""

    exemplars: Optional[torch.Tensor] = None  # [C, D] images re-encoded with gradients
    exclude: Optional[torch.Tensor] = None  # [B, C] bool, leave-one-out
    log_norm: Optional[torch.Tensor] = None  # [B] normalizer; None = number kept
    n_candidates: int = 0
    n_short: int = 0  # rows with fewer than k retrieved survivors (RAT)
    index_version: int = -1


class PriorSampler:
    """Chooses each minibatch's exemplars: the exact M-subset, or RAT's retrieved union.

    train_images: [N, D] float tensor of the exemplars as the prior encodes them (grey levels
    for dynamically binarized data, as the reference code does).
    """

    def __init__(self, prior_cfg, train_images: torch.Tensor,
                 search: Optional[NeighbourSearch] = None, seed: int = 0):
        self.cfg = prior_cfg
        self.images = train_images
        self.n = train_images.shape[0]
        self.m = min(self.n, prior_cfg.subsample or max(1, self.n // 2))
        self.search = search
        self.rng = np.random.default_rng(seed)
        if prior_cfg.kind == "exemplar" and prior_cfg.rat and search is None:
            raise ValueError("RAT needs a neighbour search (TorchExactSearch or the index service)")

    def __call__(self, model: VAEWithPrior, batch_ids: np.ndarray, x: torch.Tensor) -> PriorBatch:
        if self.cfg.kind != "exemplar":
            return PriorBatch()
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        if self.cfg.rat:
            return self._retrieved(model, batch_ids, x)
        return self._exact_subset(batch_ids, x)

    def _exact_subset(self, batch_ids: np.ndarray, x: torch.Tensor) -> PriorBatch:
        subset = np.sort(self.rng.choice(self.n, size=self.m, replace=False))
        exclude = torch.from_numpy(subset[None, :] == batch_ids[:, None]).to(x.device)
        return PriorBatch(exemplars=self.images[torch.from_numpy(subset)].to(x.device),
                          exclude=exclude, n_candidates=len(subset))

    def _retrieved(self, model: VAEWithPrior, batch_ids: np.ndarray, x: torch.Tensor) -> PriorBatch:
        with torch.no_grad():
            queries = model.net.encode_top(x)[0].float().cpu().numpy()
        coins = draw_coins(self.n, self.m, self.rng)
        depth = query_depth(self.cfg.k, self.n, self.m, self.cfg.safety)
        ids, version = self.search.search(queries, depth)
        cand = assemble_candidates(ids, batch_ids, coins, self.cfg.k)
        exclude = torch.from_numpy(cand.exclude).to(x.device)
        log_norm = (torch.from_numpy(cand.log_norm).to(x.device, x.dtype)
                    if self.cfg.normalizer == "subset" else None)
        return PriorBatch(exemplars=self.images[torch.from_numpy(cand.ids)].to(x.device),
                          exclude=exclude, log_norm=log_norm, n_candidates=len(cand.ids),
                          n_short=cand.n_short, index_version=version)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


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
    out.loss.backward()
    if normalize_grads:
        normalize_gradients(model.parameters())
    optimizer.step()
    return {"loss": loss, "log_px": log_px, "kl": kl, "candidates": prior.n_candidates,
            "short_rows": prior.n_short, "index_version": prior.index_version}


@torch.no_grad()
def validation_elbo(model: VAEWithPrior, x: torch.Tensor, centres: Optional[torch.Tensor],
                    batch_size: int = 250, samples: int = 1) -> dict:
    """Mean ELBO (beta = 1), log p(x|z) and KL over x [N, D], each averaged over `samples`
    posterior draws per image (eval.validation_samples in training).

    Exemplar prior: `centres` = the encoder means of ALL training exemplars (normalizer N, no
    leave-one-out: validation images are not exemplars).
    """
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

"""The authors' own training step (sajadn/Exemplar-VAE), timed beside ours by bench_step.py.

Nothing of their code is copied here: `--reference DIR` points at the user's checkout of
https://github.com/sajadn/Exemplar-VAE, and this module imports its model, optimizer and
argument defaults from there at run time. The step is the body of their `train_one_epoch`
(calculate_loss, backward, AdamNormGrad step, and for RAT the cache they carry across steps),
on the same binarized batches and starting from the same weights as our variants, so both
codes see the same neighbour structure.

Their data-loading module imports torchvision and wget at import time, for downloads this
bench never makes (it hands them our MNIST tensors); where those packages are missing, empty
stand-in modules are registered so that their argument parser can be imported.
"""

from __future__ import annotations

import sys
import types
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from exvae_dist.core.loop import binarize

KINDS = {"gaussian": ["--prior", "standard"],
         "rat": ["--prior", "exemplar_prior", "--approximate_prior", "True"],
         "exact": ["--prior", "exemplar_prior", "--approximate_prior", "False"]}


def gate_halves(w: torch.Tensor, b: torch.Tensor):
    """Our fused gated layer's Linear [2n, in] -> (h weight, h bias, g weight, g bias): F.glu
    takes the first half as the value and the second as the gate."""
    n = w.shape[0] // 2
    return w[:n], b[:n], w[n:], b[n:]


def _import_authors(ref_dir: Path):
    if not (ref_dir / "density_estimation.py").is_file() or not (ref_dir / "models" / "VAE.py").is_file():
        raise SystemExit(f"--reference {ref_dir}: not a checkout of sajadn/Exemplar-VAE (no "
                         "density_estimation.py or models/VAE.py); clone "
                         "https://github.com/sajadn/Exemplar-VAE and pass its folder")
    for name in ("torchvision", "wget"):  # imported at module level by their data loader only
        if name not in sys.modules and find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.datasets = types.ModuleType(f"{name}.datasets")
            sys.modules[name] = stub
            sys.modules[f"{name}.datasets"] = stub.datasets
    sys.path.insert(0, str(ref_dir))
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import density_estimation
        from models.VAE import VAE
        from utils.optimizer import AdamNormGrad
    finally:
        sys.argv = saved_argv
    return density_estimation.parser, VAE, AdamNormGrad


class AuthorsStep:
    """One training step of the authors' code: kind = gaussian, rat (k = 10) or exact (M =
    25,000), on MNIST's 50,000 training images, from our pretrained weights `state`."""

    def __init__(self, kind: str, ref_dir: str, splits, state: dict):
        parser, vae_class, optimizer_class = _import_authors(Path(ref_dir).resolve())
        args = parser.parse_args(["--dataset_name", "dynamic_mnist", "--model_name", "vae",
                                  "--number_components", "25000"] + KINDS[kind])
        # what their load_dataset sets for dynamic MNIST
        args.device, args.input_size, args.input_type = "cpu", [1, 28, 28], "binary"
        args.dynamic_binarization, args.training_set_size = True, splits.train_x.shape[0]
        self.train_x = torch.from_numpy(splits.train_x)
        n = self.train_x.shape[0]
        self.dataset = torch.utils.data.TensorDataset(
            self.train_x, torch.arange(n).reshape(-1, 1), torch.zeros(n, dtype=torch.long))
        torch.manual_seed(0)
        self.model = vae_class(args)
        self._load(state)
        self.opt = optimizer_class(self.model.parameters(), lr=args.lr)
        self.cache = None
        if kind == "rat":  # their train_one_epoch fills it at the epoch's start
            with torch.no_grad():
                self.cache = self.model.cache_z(self.dataset)
        self.extra: dict = {"candidates": [], "grad_candidates": []}
        self._encoded = 0
        q_z = self.model.q_z

        def counting_q_z(x, prior=False):  # counts the exemplars their step encodes
            if prior:
                self._encoded = x.shape[0]
            return q_z(x, prior=prior)
        self.model.q_z = counting_q_z

    @torch.no_grad()
    def _load(self, state: dict) -> None:
        mine = dict(self.model.named_parameters())
        for ours, theirs in (("net.encoder", "q_z_layers"), ("net.decoder", "p_x_layers")):
            for j in range(2):
                wh, bh, wg, bg = gate_halves(state[f"{ours}.{j}.linear.weight"],
                                             state[f"{ours}.{j}.linear.bias"])
                for name, value in (("h.weight", wh), ("h.bias", bh), ("g.weight", wg), ("g.bias", bg)):
                    mine[f"{theirs}.{j}.{name}"].copy_(value)
        for ours, theirs in (("net.q_z.mean", "q_z_mean"), ("net.q_z.logvar", "q_z_logvar.linear"),
                             ("net.decoder.2", "p_x_mean.linear")):
            mine[f"{theirs}.weight"].copy_(state[f"{ours}.weight"])
            mine[f"{theirs}.bias"].copy_(state[f"{ours}.bias"])
        if "prior_log_variance" in mine:
            mine["prior_log_variance"].fill_(float(state["prior.log_var"]))

    @torch.no_grad()
    def check_weights(self, our_model) -> float:
        """Largest |difference| between the two codes on the same weights, over the encoder
        means and log-variances of 100 images, the pixel probabilities decoded from those
        means, and the prior's log-variance lambda."""
        x = self.train_x[:100]
        mean, logvar = our_model.net.encode_top(x)
        their_mean, their_logvar = self.model.q_z(x)
        gaps = [(their_mean - mean).abs().max(), (their_logvar - logvar).abs().max(),
                (self.model.p_x(mean)[0] - torch.sigmoid(our_model.net.decoder_params(mean))).abs().max()]
        if hasattr(self.model, "prior_log_variance") and our_model.prior_kind == "exemplar":
            gaps.append((self.model.prior_log_variance - our_model.prior.log_var).abs().max())
        return max(g.item() for g in gaps)

    def __call__(self, ids: np.ndarray, i: int) -> None:
        x = binarize(self.train_x[ids], True, 0, i, 0)  # the batch our variants see
        self.opt.zero_grad()
        self._encoded = 0
        loss, _, _ = self.model.calculate_loss((x, torch.as_tensor(ids).reshape(-1, 1)), 1.0,
                                               average=True, cache=self.cache, dataset=self.dataset)
        loss.backward()
        self.opt.step()
        loss.item()
        if self.cache is not None:  # as their loop does after each step
            self.cache = (self.cache[0].detach(), self.cache[1].detach())
        self.extra["candidates"].append(self._encoded)
        self.extra["grad_candidates"].append(self._encoded)

"""`python -m exvae_dist.augment <run dir | MLflow run id> [key=value ...]`

Generative data augmentation (METHOD.md section 4) on permutation-invariant MNIST or
Fashion-MNIST, whichever the run was trained on. The same MLP 784-H-H-10 (ReLU) is trained
twice from the same initialization, batch order and seed:

- real only:  loss = CE_ls(real)
- augmented:  loss = real_weight * CE_ls(real) + (1 - real_weight) * CE_ls(generated)

where CE_ls is cross-entropy with label smoothing and each real image x_i of a minibatch gets
one fresh exemplar-conditioned sample per step, z ~ Normal(mu(x_i), s^2 I) decoded to pixel
means (augment.generated=mean) or a Bernoulli draw of them (=bernoulli), with x_i's label.
(A model without an exemplar prior uses z ~ q(z | x_i) instead, and says so.) SGD with
momentum, lr decaying linearly to 1% over all steps. Training images: the run's training
split as grey levels; test images: the official test set as grey levels.
Writes <run dir>/augment/summary.json and logs the errors to the run's MLflow run.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import load_dataset
from ..data import sources
from ..data.datasets import IMAGE_PIXELS, data_root
from ..data.download import ensure_file
from ..data.readers import read_idx
from ..evaluation.runs import TrainedRun
from .cli import run_command
from ..evaluation.exemplar_sets import choose_set
from ..evaluation.generation import draw_images
from ..common.jsonio import dumps, write_json
from ..common.levels import from_bytes
from ..core.objective import VAEWithPrior, encode_means
from ..runs.tracking import open_run_tracker
from ..runs.hardware import resolve_device

log = logging.getLogger(__name__)

SUPPORTED = ("mnist", "fashion_mnist")
# The paper's classifier recipe (docs/results.md), the same for both trainings so that only the
# generated images differ between them: SGD momentum 0.9, cross-entropy label smoothing 0.1
MOMENTUM = 0.9
LABEL_SMOOTHING = 0.1


def make_classifier(x_dim: int, hidden: int, n_classes: int = 10) -> nn.Module:
    """The MLP x_dim-H-H-n_classes with ReLU."""
    return nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes))


class Generator:
    """One fresh sample per real training image and call: ids [B] -> images [B, D] in [0, 1]."""

    def __init__(self, model: VAEWithPrior, train_x: torch.Tensor, how: str,
                 generator: torch.Generator, means: Optional[torch.Tensor] = None):
        self.model, self.how, self.gen = model, how, generator
        # the exemplar set's stored latents when given (a grown set), else encoded now
        self.means = encode_means(model.net, train_x) if means is None else means
        if model.prior_kind == "exemplar":
            self.source = "exemplar-conditioned: z ~ Normal(mu(x_i), s^2 I), the exemplar prior's kernel"
        else:
            self.logvars = torch.cat([model.net.encode_top(train_x[s:s + 2000])[1].detach()
                                      for s in range(0, train_x.shape[0], 2000)])
            self.source = (f"posterior: z ~ q(z | x_i) (the model has a {model.prior_kind} prior, "
                           f"no exemplar kernel)")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        how = "sample" if self.how == "bernoulli" else "mean"
        if self.model.prior_kind == "exemplar":  # the generation code of `generate`
            return draw_images(self.model, len(ids), self.means, ids.cpu(), self.gen,
                               how)[0].to(self.means.device)
        mu = self.means[ids]
        z = mu + torch.exp(0.5 * self.logvars[ids]) * torch.randn(mu.shape, generator=self.gen
                                                                   ).to(mu.device)
        params = self.model.net.decoder_params(z)
        lik = self.model.net.likelihood
        return (lik.mean(params) if how == "mean"
                else lik.sample(params.cpu(), self.gen).to(mu.device))


def grey_test_set(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The official test images as grey levels [n, 784] in [0, 1] and labels [n] (the
    DataSplits test set is binarized for the likelihood; a classifier sees grey levels);
    the first data.n_test of them when that is set, as everywhere else."""
    registry = sources.MNIST if cfg.data.name == "mnist" else sources.FASHION_MNIST
    folder = data_root(cfg.data) / sources.FOLDERS[cfg.data.name]
    images = read_idx(ensure_file(registry["test_images"], folder, download=cfg.data.download))
    labels = read_idx(ensure_file(registry["test_labels"], folder, download=cfg.data.download))
    n = len(images) if cfg.data.n_test is None else min(cfg.data.n_test, len(images))
    x = from_bytes(images[:n].reshape(n, IMAGE_PIXELS)).numpy()
    return x, labels[:n].astype(np.int64)


@torch.no_grad()
def test_error(clf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    clf.eval()
    wrong = sum((clf(x[s:s + 2000]).argmax(1) != y[s:s + 2000]).sum().item()
                for s in range(0, x.shape[0], 2000))
    clf.train()
    return wrong / x.shape[0]


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                     test_y: torch.Tensor, acfg, generate: Optional[Generator] = None,
                     desc: str = "classifier", progress: bool = True) -> dict:
    """Trains the MLP (augment config `acfg`); generate=None: real images only. The seed fixes
    initialization and batch order, so both variants start and walk alike."""
    torch.manual_seed(acfg.seed)
    # initialized on the CPU, then moved: the same initial weights on every device
    clf = make_classifier(train_x.shape[1], acfg.hidden).to(train_x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=acfg.lr, momentum=MOMENTUM)
    steps_per_epoch = train_x.shape[0] // acfg.batch_size
    total = steps_per_epoch * acfg.epochs
    # linear decay from lr to 1% of lr over all steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.99 * min(t, total) / total)
    order_rng = np.random.default_rng(acfg.seed)
    epochs = range(acfg.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    history = []
    t0 = time.perf_counter()
    for epoch in epochs:
        perm = torch.from_numpy(order_rng.permutation(train_x.shape[0]))
        for i in range(steps_per_epoch):
            ids = perm[i * acfg.batch_size:(i + 1) * acfg.batch_size]
            x, y = train_x[ids], train_y[ids]
            loss = F.cross_entropy(clf(x), y, label_smoothing=LABEL_SMOOTHING)
            if generate is not None:
                gen_loss = F.cross_entropy(clf(generate(ids)), y,
                                           label_smoothing=LABEL_SMOOTHING)
                loss = acfg.real_weight * loss + (1.0 - acfg.real_weight) * gen_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        err = test_error(clf, test_x, test_y)
        history.append(err)
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(test_error=f"{100 * err:.2f}%")
    return {"test_error": history[-1], "test_error_per_epoch": history,
            "seconds": time.perf_counter() - t0}


def augment(trained: TrainedRun) -> dict:
    """Both classifiers; writes <run>/augment/summary.json, logs to MLflow, returns the summary."""
    cfg, a = trained.cfg, trained.cfg.augment
    if cfg.data.name not in SUPPORTED:
        raise ValueError(f"augmentation is defined for {', '.join(SUPPORTED)} (10 labelled "
                         f"classes); this run was trained on {cfg.data.name}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)  # generation and both classifiers run there
    trained.model.to(device)
    splits = load_dataset(cfg.data)
    # the classifier's real images are the exemplar set in use (eval.exemplars: a grown set
    # adds its images, with their labels)
    exemplar_set = choose_set(trained, splits)
    if exemplar_set.labels is None or (np.asarray(exemplar_set.labels) < 0).any():
        raise ValueError(f"augmentation needs a label for every exemplar; "
                         f"{exemplar_set.description} has unlabelled ones")
    train_x = torch.from_numpy(np.ascontiguousarray(exemplar_set.images)).to(device)
    train_y = torch.from_numpy(np.asarray(exemplar_set.labels, dtype=np.int64)).to(device)
    tx, ty = grey_test_set(cfg)
    test_x, test_y = torch.from_numpy(tx).to(device), torch.from_numpy(ty).to(device)
    log.info("augment: classifiers trained on %d %s images, tested on %d grey test images%s",
             train_x.shape[0], splits.name, test_x.shape[0],
             f" (data.n_test={cfg.data.n_test})" if cfg.data.n_test is not None else "")
    means = (None if exemplar_set.latents is None
             else torch.from_numpy(exemplar_set.latents).to(device))
    # a CPU generator: the draws are made on the CPU and moved (the same on every device)
    generate = Generator(trained.model, train_x, a.generated,
                         torch.Generator().manual_seed(a.seed + 1), means)
    progress = cfg.train.progress
    real = train_classifier(train_x, train_y, test_x, test_y, a, None, "real only", progress)
    log.info("real only: test error %.2f%%", 100 * real["test_error"])
    aug = train_classifier(train_x, train_y, test_x, test_y, a, generate, "augmented", progress)
    log.info("augmented: test error %.2f%%", 100 * aug["test_error"])
    summary = {
        "run": str(trained.path), "checkpoint": str(trained.checkpoint), "epoch": trained.epoch,
        "dataset": splits.name, "n_train": int(train_x.shape[0]), "n_test": int(test_x.shape[0]),
        "exemplars": exemplar_set.description,
        "classifier": f"MLP {train_x.shape[1]}-{a.hidden}-{a.hidden}-10 ReLU",
        "optimizer": (f"SGD momentum {MOMENTUM}, lr {a.lr} decaying linearly to 1% over "
                      f"{a.epochs} epochs, batch {a.batch_size}"),
        "label_smoothing": LABEL_SMOOTHING,
        "loss": (f"{a.real_weight} * loss(real) + {1 - a.real_weight:.1f} * loss(generated)"),
        "generated_images": ("decoder pixel means" if a.generated == "mean"
                             else "Bernoulli samples of the decoder"),
        "generated_from": generate.source,
        "seed": a.seed, "epochs": a.epochs, "hidden": a.hidden,
        "test_error_real_only": real["test_error"],
        "test_error_augmented": aug["test_error"],
        "real_only": real, "augmented": aug,
    }
    path = write_json(trained.path / "augment" / "summary.json", summary)
    tracker = open_run_tracker(trained.path)
    tracker.log_metrics({"augment_test_error_real_only": real["test_error"],
                         "augment_test_error_augmented": aug["test_error"]},
                        int(trained.epoch or 0))
    tracker.log_artifact(path, "augment")
    tracker.end()
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    trained = run_command(
        "python -m exvae_dist.augment",
        "Generative data augmentation: test error of the same MLP classifier trained on real "
        "images only and with one fresh exemplar-conditioned sample per real image and step. "
        "Writes <run dir>/augment/summary.json.",
        ("augment", "data.root", "train.threads", "train.progress", "train.device",
         "eval.checkpoint", "eval.exemplars"),
        "augment.hidden=1024 augment.epochs=100 augment.seed=0", argv)
    if trained is None:
        return 2
    try:
        summary = augment(trained)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dumps({k: summary[k] for k in ("dataset", "n_test", "classifier", "epochs", "seed",
                                         "generated_images", "generated_from",
                                         "test_error_real_only", "test_error_augmented")}))
    return 0


if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))

"""`python -m exvae_dist.evaluate <run dir | MLflow run id> [key=value ...]`

Evaluates a trained run on its test set (METHOD.md section 4) and writes everything into its
own folder `<run dir>/eval/<eval.name or the UTC start time>/` (summary.json + PNGs; a named
folder that exists is replaced whole, so no stale picture survives), also logged to the
run's MLflow run under eval/<name>/:

- test log-likelihood by importance sampling (eval.n_samples, 5000 by default) with the exact
  exemplar prior over all N training exemplars, or with eval.prior_neighbours=k the
  nearest-neighbour-truncated prior, a LOWER BOUND (every output says which);
- test ELBO (one sample), its reconstruction and KL terms, and the active latent units
  (Burda et al.: Cov_x(E_q[z_u]) > 0.01, top latent);
- kNN classification error on encoder means (reference = train + validation) for labelled data;
- pictures: random samples, exemplar-conditioned samples, reconstructions, latent
  interpolations between two exemplars, a t-SNE map of test means coloured by label.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import config as config_mod
from ..api import ExemplarVAE
from ..data import DataSplits, binarize_once
from ..evaluation import knn, pictures
from ..evaluation.likelihood import PRIOR_TOLERANCE, describe_prior
from ..evaluation.runs import TrainedRun, load_splits
from .cli import run_command
from ..evaluation.exemplar_sets import ExemplarSet, ExemplarSetError, choose_set
from ..common.jsonio import dumps, write_json
from ..core.objective import encode_means
from ..core.step import validation_elbo
from ..runs.tracking import open_run_tracker
from ..runs.hardware import resolve_device

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016
# test means in the t-SNE map: enough to show the classes' clusters, while t-SNE (quadratic
# in the points) stays a few seconds of an evaluation
TSNE_POINTS = 2000


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, list]:
    """means: [n, d] encoder means over a data set -> (#units whose variance over the data
    exceeds threshold, the per-unit variances)."""
    var = means.double().var(dim=0, unbiased=True)
    return int((var > threshold).sum().item()), [round(v, 6) for v in var.tolist()]


def log_likelihood(scorer: ExemplarVAE, x: torch.Tensor) -> dict:
    """Importance-sampled test log-likelihood of x [n, D] (ExemplarVAE.log_prob's estimate),
    batched, with a progress bar and its ETA."""
    trained = scorer.trained
    e = trained.cfg.eval
    model = trained.model
    centres = scorer.centres()
    n_exemplars = 0 if centres is None else centres.shape[0]
    res = scorer._log_prob(x, progress=trained.cfg.train.progress)
    pools, max_error, seconds = res["pools"], res["max_error"], res["seconds"]
    v = res["values"]
    truncated = (model.prior_kind == "exemplar" and e.prior_neighbours is not None
                 and e.prior_neighbours < n_exemplars)
    dims = x.shape[1]
    out = {
        "value": v.mean().item(),
        "stderr": (v.std().item() / math.sqrt(len(v))) if len(v) > 1 else 0.0,
        # -log2 p(x) per sub-pixel: binary pixels for Bernoulli, 8-bit levels for dlogistic
        "bits_per_dim": -v.mean().item() / (dims * math.log(2.0)),
        "units": f"nats per image; bits_per_dim over {dims} dimensions",
        "prior": describe_prior(model.prior_kind, n_exemplars, e.prior_neighbours,
                                PRIOR_TOLERANCE, e.prior_pool),
        "is_lower_bound": truncated,
        "n_images": len(v),
        "n_samples": e.n_samples,
        "seconds": seconds,
        "images_per_second": len(v) / seconds,
    }
    if model.prior_kind == "exemplar":
        out["neighbours"] = e.prior_neighbours
        out["certified_max_error_nats"] = max_error
        # per image, the median of its samples' pools (each sample's pool is certified alone)
        out["pool_size_median"] = float(np.median(pools)) if pools else 0.0
        out["pool_size_max"] = int(max(pools)) if pools else 0
    return out


def make_pictures(trained: TrainedRun, splits: DataSplits, centres: Optional[torch.Tensor],
                  test_x: torch.Tensor, test_means: torch.Tensor, out: Path,
                  exemplar_images: Optional[np.ndarray] = None) -> dict:
    """Every picture of the evaluation; returns {name: path}. exemplar_images: [N, D] of the
    exemplar set in use (default: the training images)."""
    e, model, shape = trained.cfg.eval, trained.model, trained.image_shape
    train_x = torch.from_numpy(splits.train_x if exemplar_images is None else exemplar_images)
    gen = torch.Generator().manual_seed(e.seed)
    files = {"samples": pictures.random_samples(model, centres, out / "samples.png", shape,
                                                seed=e.seed)}
    if model.prior_kind == "exemplar":
        ids = torch.randperm(train_x.shape[0], generator=gen)[:10]
        files["exemplar_samples"] = pictures.exemplar_samples(
            model, centres, train_x, ids, out / "exemplar_samples.png", shape, seed=e.seed)
    files["reconstructions"] = pictures.reconstructions(model, test_x[:50],
                                                        out / "reconstructions.png", shape)
    pairs = torch.randperm(train_x.shape[0], generator=gen)[:10].reshape(5, 2)
    files["interpolations"] = pictures.interpolations(model, train_x, pairs,
                                                      out / "interpolations.png", shape)
    n = min(TSNE_POINTS, test_means.shape[0])
    labels = splits.test_y[:n] if splits.test_y is not None else None
    files["tsne"] = pictures.tsne_map(test_means[:n].numpy(), labels, out / "tsne.png",
                                      seed=e.seed, title=f"t-SNE of {n} test encoder means")
    return {k: str(v) for k, v in files.items()}


def evaluate(trained: TrainedRun, splits: Optional[DataSplits] = None) -> dict:
    """Runs every evaluation the config asks for; writes <run>/eval/<name>/summary.json and
    PNGs (output_folder), logs them to the run's MLflow run and returns the summary
    (`summary["written_to"]` is the folder)."""
    cfg, model = trained.cfg, trained.model
    e = cfg.eval
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # the heavy parts (ELBO, log-likelihood, encoder means) run on train.device; kNN and
    # pictures on the CPU
    device = resolve_device(cfg.train.device)
    model.to(device)
    splits = splits or load_splits(cfg)
    # what can be refused is refused before the work starts and before the folder exists
    check_knn_ks(e, splits)
    # grey-level exemplars, as in training; eval.exemplars picks a grown set
    exemplar_set: ExemplarSet = choose_set(trained, splits)
    out = output_folder(trained.path, e.name)
    try:
        return _evaluate_into(out, trained, splits, exemplar_set, device)
    except BaseException:
        # stopped (Ctrl-C) or failed: no half-filled folder is left (summary.json, written
        # last, marks a complete one)
        if not (out / "summary.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            if out.parent.is_dir() and not any(out.parent.iterdir()):
                out.parent.rmdir()
        raise


def _evaluate_into(out: Path, trained: TrainedRun, splits: DataSplits,
                   exemplar_set: ExemplarSet, device: torch.device) -> dict:
    cfg, model = trained.cfg, trained.model
    e = cfg.eval
    test_x = torch.from_numpy(splits.test_x).to(device)
    if e.n_test is not None:
        test_x = test_x[:e.n_test]
    t_start = time.perf_counter()
    centres = (None if exemplar_set.latents is None
               else torch.from_numpy(exemplar_set.latents).to(device))
    summary: dict = {
        "run": str(trained.path), "checkpoint": str(trained.checkpoint), "epoch": trained.epoch,
        "written_to": str(out),
        "dataset": splits.name, "dataset_note": splits.note, "arch": cfg.model.arch,
        "prior_kind": model.prior_kind, "likelihood": cfg.model.likelihood,
        "n_exemplars": int(len(exemplar_set.images)) if centres is not None else 0,
        "exemplars": exemplar_set.description, "exemplar_set_version": exemplar_set.version,
        "data_labels": cfg.data.labels,
        "test_labels": cfg.eval.test_labels if cfg.eval.test_labels is not None else cfg.data.labels,
        "n_test": int(test_x.shape[0]),
    }
    if model.prior_kind == "exemplar":
        summary["prior_log_var"] = model.prior.log_var.item()

    torch.manual_seed(e.seed)
    elbo = validation_elbo(model, test_x, centres)
    summary["test_elbo"] = elbo["elbo"]
    summary["test_reconstruction"] = elbo["log_px"]  # E_q log p(x|z), one sample
    summary["test_kl"] = elbo["kl"]
    summary["elbo_note"] = "one posterior sample per image, beta = 1" + (
        "; exemplar prior over all N exemplars, normalizer N" if centres is not None else "")
    test_means = encode_means(model.net, test_x).cpu()
    summary["active_units"], summary["unit_variances"] = active_units(test_means)
    summary["active_units_note"] = (f"Cov over the test set of E_q[z_top] > "
                                    f"{ACTIVE_UNIT_THRESHOLD} (Burda et al.), top latent")

    if e.likelihood:
        summary["log_likelihood"] = log_likelihood(ExemplarVAE(trained, exemplar_set, splits),
                                                   test_x)
        ll = summary["log_likelihood"]
        log.info("test log-likelihood %.3f +- %.3f nats (%s)", ll["value"], ll["stderr"],
                 ll["prior"])

    if e.knn:
        if splits.train_y is None or splits.test_y is None:
            summary["knn_error"] = None
            summary["knn_note"] = f"{splits.name} has no labels: kNN skipped"
        else:
            # training images are grey (dynamic binarization): binarize them once so the
            # reference vectors come from the same kind of image as the (binary) test set
            ref_x = (binarize_once(splits.train_x, cfg.data.binarize_seed, 3) if splits.dynamic
                     else splits.train_x)
            ref = torch.cat([encode_means(model.net, torch.from_numpy(ref_x).to(device)),
                             encode_means(model.net, torch.from_numpy(splits.valid_x).to(device))
                             ]).cpu()
            ref_y = np.concatenate([splits.train_y, splits.valid_y])
            errors = knn.knn_errors(ref, torch.from_numpy(ref_y), test_means,
                                    torch.from_numpy(splits.test_y[:test_x.shape[0]]),
                                    e.knn_ks, progress="kNN")
            summary["knn_error"] = {str(k): v for k, v in errors.items()}
            summary["knn_note"] = ("majority vote on encoder means, reference = train (binarized "
                                   "once) + validation, Euclidean distance")

    if e.pictures:
        model.cpu()
        summary["pictures"] = make_pictures(trained, splits,
                                            None if centres is None else centres.cpu(),
                                            test_x.cpu(), test_means, out,
                                            exemplar_set.images)
    summary["seconds"] = time.perf_counter() - t_start
    # summary.json last: its presence marks a complete evaluation folder
    path = write_json(out / "summary.json", summary)
    _log_to_mlflow(trained, summary, path)
    return summary


def check_knn_ks(e, splits: DataSplits) -> None:
    """eval.knn_ks against the kNN reference set (training + validation images)."""
    if not e.knn or splits.train_y is None or splits.test_y is None:
        return
    n_ref = len(splits.train_y) + len(splits.valid_y)
    if max(e.knn_ks) > n_ref:
        raise config_mod.ConfigError(
            f"eval.knn_ks={list(e.knn_ks)}: k={max(e.knn_ks)} exceeds the {n_ref} reference "
            f"vectors of the kNN classifier (training + validation images): lower eval.knn_ks "
            f"or set eval.knn=false")


def output_folder(run: Path, name: Optional[str]) -> Path:
    """<run>/eval/<name>, empty. name=None: the UTC time (with -2, -3 ... if taken), so each
    evaluation keeps its own folder; a given name replaces that folder's old contents."""
    root = run / "eval"
    if name is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out, n = root / stamp, 1
        while out.exists():
            n += 1
            out = root / f"{stamp}-{n}"
    else:
        out = root / name
        if out.exists():
            log.info("eval.name=%s: replacing the earlier evaluation in %s", name, out)
            shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _log_to_mlflow(trained: TrainedRun, summary: dict, summary_path: Path) -> None:
    tracker = open_run_tracker(trained.path)
    step = int(trained.epoch or 0)
    metrics = {k: summary[k] for k in ("test_elbo", "test_reconstruction", "test_kl")}
    metrics["test_active_units"] = summary["active_units"]
    if "log_likelihood" in summary:
        key = ("test_log_likelihood_lower_bound" if summary["log_likelihood"]["is_lower_bound"]
               else "test_log_likelihood")
        metrics[key] = summary["log_likelihood"]["value"]
    for k, v in (summary.get("knn_error") or {}).items():
        metrics[f"test_knn_error_k{k}"] = v
    tracker.log_metrics(metrics, step)
    artifacts = f"eval/{summary_path.parent.name}"
    tracker.log_artifact(summary_path, artifacts)
    for p in (summary.get("pictures") or {}).values():
        tracker.log_artifact(p, artifacts)
    tracker.end()


def main(argv: Optional[list[str]] = None) -> int:
    trained = run_command(
        "python -m exvae_dist.evaluate",
        "Evaluate a trained run: test log-likelihood (importance sampling, exact or "
        "nearest-neighbour-truncated exemplar prior), ELBO / reconstruction / KL, active units, "
        "kNN error, pictures. Writes <run dir>/eval/<eval.name or UTC time>/ and logs to the run's MLflow run. Any "
        "training key works too.",
        ("eval", "data.root", "train.threads", "train.device"),
        "eval.n_samples=1000 eval.prior_neighbours=100", argv)
    if trained is None:
        return 2
    try:
        summary = evaluate(trained)
    except (config_mod.ConfigError, ExemplarSetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("test_elbo", "test_reconstruction", "test_kl",
                                     "active_units") if k in summary}
    if "log_likelihood" in summary:
        brief["log_likelihood"] = {k: summary["log_likelihood"][k]
                                   for k in ("value", "stderr", "bits_per_dim", "prior",
                                             "n_samples", "n_images")}
    brief["exemplars"] = summary["exemplars"]
    brief["knn_error"] = summary.get("knn_error")
    brief["written_to"] = summary["written_to"]
    print(dumps(brief))
    return 0


if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))

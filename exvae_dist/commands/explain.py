"""`python -m exvae_dist.explain RUN [--images test:0-31 | FILE.npz] [--memorisation N]`: the
command line of evaluation/attribution.py (attributions and the memorisation check)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..common.jsonio import write_json
from ..common.levels import from_bytes

from ..evaluation.attribution import (attribution_grid, attribution_weights, memorisation_check, memorisation_histogram, summarize)


def _images_arg(spec: str, splits) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], str]:
    """--images test:0-31 | valid:... | train:... | FILE.npz -> (images [B, D] floats,
    labels or None, source exemplar ids or None, description)."""
    from ..evaluation.exemplar_sets import ExemplarSetError, parse_ids

    if spec.endswith(".npz"):
        with np.load(spec) as f:
            if "images" not in f:
                raise ExemplarSetError(f"{spec} has no 'images' array")
            x = f["images"].reshape(len(f["images"]), -1)
            x = from_bytes(x).numpy() if x.dtype == np.uint8 else x.astype(np.float32)
            labels = f["labels"] if "labels" in f else None
            sources = f["exemplar_ids"] if "exemplar_ids" in f else None
        return x, labels, sources, spec
    split, _, ids = spec.partition(":")
    if split not in ("train", "valid", "test") or not ids:
        raise ExemplarSetError(f"--images {spec!r}: use SPLIT:IDS (e.g. test:0-31) or FILE.npz")
    rows = np.asarray(parse_ids(ids))
    x_all, y_all = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    if rows.max() >= len(x_all):
        raise ExemplarSetError(f"--images {spec}: the {split} split has {len(x_all)} images")
    return x_all[rows], None if y_all is None else y_all[rows], None, spec
def main(argv: Optional[list[str]] = None) -> int:
    from . import cli
    from .. import config as config_mod
    from ..data import load_dataset
    from ..evaluation.runs import load_run, load_splits
    from ..evaluation.exemplar_sets import ExemplarSetError, choose_set
    from ..evaluation.generation import generate

    parser = cli.make_parser(
        "python -m exvae_dist.explain", keys=("eval.", "train.threads"),
        description="Exemplar attributions of images (the posterior responsibility of each "
                    "exemplar, averaged over q(z|x)) as JSON and a PNG grid, and a "
                    "memorisation check of generated images against the training set. "
                    "Writes <run>/explain/ (or --out).", notes=__doc__)
    parser.add_argument("run", help="run directory or MLflow run id")
    parser.add_argument("--images", default="test:0-31",
                        help="SPLIT:IDS (default test:0-31) or FILE.npz (e.g. from generate)")
    parser.add_argument("--top", type=int, default=8, help="exemplars per image (default 8)")
    parser.add_argument("--samples", type=int, default=100,
                        help="posterior samples per image (default 100)")
    parser.add_argument("--memorisation", type=int, default=0, metavar="N",
                        help="also run the memorisation check with N generated and N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default <run>/explain)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.exemplars=original")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    cli.setup_logging()
    try:
        trained = load_run(args.run, args.overrides)
        cfg, model = trained.cfg, trained.model
        if model.prior_kind != "exemplar" and args.memorisation <= 0:
            raise ExemplarSetError(
                f"{trained.path} has a {model.prior_kind} prior: attributions need an "
                f"exemplar-prior run; for this run only --memorisation N (generated samples "
                f"against the training and test images) applies")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        out_dir = Path(args.out) if args.out else trained.path / "explain"
        splits = load_splits(cfg)
        ex = choose_set(trained, splits)
        report: dict = {"run": str(trained.path), "prior": model.prior_kind,
                        "exemplars": ex.description}
        t0 = time.perf_counter()
        if model.prior_kind == "exemplar":
            x, labels, sources, desc = _images_arg(args.images, splits)
            gen = torch.Generator().manual_seed(args.seed)
            weights = attribution_weights(model, torch.from_numpy(x), torch.from_numpy(ex.latents),
                                          args.samples, gen)
            rows = summarize(weights, args.top, ex.labels, sources)
            for r, row in enumerate(rows):
                row["image"] = r
                row["label"] = None if labels is None else int(labels[r])
            report["attribution"] = {
                "images": desc, "samples_per_image": args.samples, "top": args.top,
                "estimator": "mean over z ~ q(z|x) of softmax_n(-|z - mu_n|^2 / 2 s^2)",
                "prior_log_var": model.prior.log_var.item(), "per_image": rows}
            report["attribution_json"] = str(write_json(out_dir / "attributions.json",
                                                               report["attribution"]))
            report["attribution_png"] = str(attribution_grid(
                x, rows, ex.images, trained.image_shape, out_dir / "attributions.png",
                f"top exemplars by attribution weight ({desc}; {ex.description})"))
        else:
            report["attribution"] = f"skipped: a {model.prior_kind} prior has no exemplars"
        if args.memorisation > 0:
            # reference: the images the model draws from (the exemplar set in use: the
            # training images unless grown); test images of the classes in that set, on 8-bit
            # grey levels (binary where no grey levels exist)
            static = cfg.data.name == "binarized_mnist"
            known = ex.labels is not None and (np.asarray(ex.labels) >= 0).all()
            classes = sorted(set(np.asarray(ex.labels).tolist())) if known else cfg.data.labels
            grey = load_dataset(replace(cfg.data, labels=classes, n_test=None,
                                        pixels=cfg.data.pixels if static else "8bit"))
            n = args.memorisation
            drawn = generate(model, ex, n, seed=args.seed + 1, how="mean", progress=False)
            numbers, dist = memorisation_check(
                drawn["images"], ex.images, grey.test_x[:n],
                drawn["exemplar_ids"] if model.prior_kind == "exemplar" else None)
            numbers["test_classes"] = classes
            numbers["pixels"] = ("binary" if static else "8-bit grey levels") + (
                " of train and test images; generated: decoder means")
            report["memorisation"] = numbers
            write_json(out_dir / "memorisation.json", numbers)
            report["memorisation_png"] = str(memorisation_histogram(
                dist, out_dir / "memorisation.png",
                f"{model.prior_kind} prior: median generated/test NN distance "
                f"{numbers['ratio_of_medians']:.2f}"))
        report["seconds"] = time.perf_counter() - t0
    except (ExemplarSetError, config_mod.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    brief = {k: v for k, v in report.items() if k != "attribution"}
    if isinstance(report["attribution"], str):  # skipped, and why
        brief["attribution"] = report["attribution"]
    if isinstance(report["attribution"], dict):
        rows = report["attribution"]["per_image"]
        brief["mean_top_k_mass"] = float(np.mean([r["top_k_mass"] for r in rows]))
        brief["mean_effective_exemplars"] = float(np.mean([r["effective_exemplars"] for r in rows]))
    print(json.dumps(brief, indent=2, allow_nan=False))
    return 0
if __name__ == "__main__":
    from exvae_dist.commands.cli import guarded

    sys.exit(guarded(main, None))

"""Distributed training on Ray Train: `python -m exvae_dist.train`.

The only package that knows about Ray Train and DDP:

    driver.py          Ray connection, exemplar store, index service, TorchTrainer set-up
    worker.py          the per-worker loop (DDP model, steps, validation, checkpoints)
    refresh.py         the refresh pass that writes a new latent version from every rank
    service_client.py  retried index-service calls; the NeighbourSearch adapter
    exemplars.py       exemplar images in the store (ingest once, read per worker)
    collectives.py     barrier / broadcast / sum over the worker group
"""

from .driver import run  # noqa: F401

__all__ = ["run"]

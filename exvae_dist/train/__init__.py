"""Distributed training on Ray Train: `python -m exvae_dist.train`.

The only package that knows about Ray Train and DDP:

    driver.py          Ray connection, exemplar store, index service, TorchTrainer set-up
    worker.py          the worker shell around loop.fit (DDP, store cache, Ray checkpoints)
    refresh.py         the refresh pass that writes a new latent version from every rank
    service_client.py  retried index-service calls; the NeighbourSearch adapter
    exemplars.py       exemplar images in the store (ingest once, read per worker)
"""

from .driver import run  # noqa: F401

__all__ = ["run"]

"""The trainers: `local.py`, the one-process shell around the loop (`python -m
exvae_dist.trainer`), and Ray Train (`python -m exvae_dist.train`), the only code that knows
about Ray Train and DDP:

    driver.py          Ray connection, exemplar store, index service, TorchTrainer set-up
    worker.py          the worker shell around loop.fit (DDP, the exemplar cache, Ray checkpoints)
    refresh.py         the refresh pass that writes a new latent version from every rank
    refresh_actors.py  encoder actors that refresh beside training (index.refresh_workers)
    service_client.py  retried index-service calls; the NeighbourSearch over index actors
    store_images.py    a worker's exemplar images, read from the store by id
"""

from .driver import run  # noqa: F401

__all__ = ["run"]

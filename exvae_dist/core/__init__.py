"""The pure core: models, priors, the objective, the training step and loop, keyed
randomness, candidate assembly, the exact search and the exemplar cache. torch and numpy
only: no Ray, Zarr, MLflow, FAISS or matplotlib (tests/test_loop.py checks each module)."""

"""Retrieval: the exemplar store (store.py), FAISS indexes (index.py), candidate assembly
(candidates.py) and the Ray index service (service.py).

Nothing is imported here so that `import exvae_dist.core.candidates` stays cheap and
free of FAISS, Zarr and Ray; import the module you need.
"""

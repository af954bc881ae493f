"""Retrieval: the exemplar store (store.py), FAISS indexes (index.py), candidate assembly
(candidates.py) and the Ray index service (service.py).

Nothing is imported here so that `import exvae_dist.core.candidates` stays cheap and
free of FAISS, Zarr and Ray; import the module you need.
"""

import logging

# FAISS's loader logs at INFO every instruction set it could not load, each with its
# ModuleNotFoundError ("Could not load library with AVX512 support ..."): not an error, only
# noise among our INFO lines. Set here, the package that every FAISS import goes through.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

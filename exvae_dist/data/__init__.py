"""Datasets for exvae-dist: readers, a registry of files with checksums, download, splits
and binarization. Pure numpy / scipy / stdlib (no torch, Ray, Zarr or MLflow).

    from exvae_dist.data import load_dataset, dynamic_binarize
    splits = load_dataset(cfg.data)   # DataSplits: train_x [N, 784] grey, valid_x / test_x binary
"""

from .datasets import (DataSplits, binarize_once, data_root, dynamic_binarize, eight_bit,
                       keep_labels, load_dataset)
from .download import (ChecksumMismatchError, DataFileMissingError, download_file, ensure_file,
                       verify_file)

__all__ = ["DataSplits", "load_dataset", "keep_labels", "eight_bit", "data_root", "dynamic_binarize", "binarize_once",
           "ChecksumMismatchError", "DataFileMissingError", "download_file", "ensure_file",
           "verify_file"]

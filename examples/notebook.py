"""exvae-dist from Python, as in a notebook: train on an array, load the run, sample and score.

    EXVAE_DATA_DIR=../shared/data .venv/bin/python examples/notebook.py

Reads MNIST's idx files from $EXVAE_DATA_DIR/mnist (any uint8 array [N, H, W] or
[N, C, H, W] works the same), trains a small Exemplar VAE for one short epoch in this process
(runs/notebook/ under the current folder; run it again and it resumes), then loads it back.
tests/test_api.py runs this script.
"""

import gzip
import os
from pathlib import Path

import numpy as np

import exvae_dist


def read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (gzip) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


mnist = Path(os.environ.get("EXVAE_DATA_DIR", "../shared/data")) / "mnist"
images = read_idx(mnist / "train-images-idx3-ubyte.gz")[:1000]  # uint8 [1000, 28, 28]
labels = read_idx(mnist / "train-labels-idx1-ubyte.gz")[:1000]
test = read_idx(mnist / "t10k-images-idx3-ubyte.gz")[:8]

# 1. train (the same config and key=value overrides as `exvae trainer --config smoke ...`)
model = exvae_dist.fit(images, labels, config="smoke", train={
    "name": "notebook", "epochs": 1, "max_steps_per_epoch": 20, "progress": False})
print(model)

# 2. load it back: a run folder, a checkpoint file, an MLflow run id or a models:/ URI
model = exvae_dist.ExemplarVAE.load("runs/notebook")

# 3. sample from the exemplar prior (with the exemplar each image came from) and score
samples, exemplar_ids = model.sample(8, seed=0)
print("samples", samples.shape, "from exemplars", exemplar_ids.tolist(),
      "labelled", model.exemplar_labels(exemplar_ids).tolist())
binary_test = (test >= 128).astype(np.uint8) * 255  # evaluate scores binarized test images
log_px = model.log_prob(binary_test, n_samples=100)
print("log p(x) of 8 test images (nats):", np.round(log_px, 1).tolist())
ids, distances = model.nearest_exemplars(test[:2], k=3)
print("nearest exemplars of two test images:", ids.tolist(), "labels",
      model.exemplar_labels(ids).tolist())

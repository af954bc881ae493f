"""Random-row reads from the exemplar store's images under a few Zarr v3 layouts.

A RAT step reads its batch rows and its retrieved candidates (~1,100 rows for B = 100,
k = 10) at random positions of the store. One chunk per few thousand rows (the default
8192-row chunks) decompresses ~8 MB for every row asked; tiny chunks give one file each.
The sharding codec keeps small inner chunks inside few large files.

    python bench/bench_store_layout.py --rows 200000 --reads 1100 --reps 15

Zarr reads go through ExemplarStore.images (no cache); the last row uses
retrieval/store_rows.RawRows. Images: the 50,000 MNIST training digits tiled to --rows (compress like real digits).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from exvae_dist.data.readers import read_idx
from exvae_dist.retrieval.store import RANDOM_READ_LAYOUT, ExemplarStore, ImageLayout
from exvae_dist.retrieval.store_rows import RawRows, open_row_reader

LAYOUTS = {
    "8192-row chunks, unsharded (old default)": ImageLayout(chunk_rows=8192),
    "256-row chunks, unsharded": ImageLayout(chunk_rows=256),
    "shards 8192 / inner 1 row": ImageLayout(chunk_rows=1, shard_rows=8192),
    "shards 8192 / inner 16 rows": ImageLayout(chunk_rows=16, shard_rows=8192),
    "shards 8192 / inner 64 rows": ImageLayout(chunk_rows=64, shard_rows=8192),
    "raw 8192-row chunks (no compression), Zarr read": ImageLayout(chunk_rows=8192, compress=False),
    "raw 8192-row chunks (no compression), pread (RawRows)": RANDOM_READ_LAYOUT,
}


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--reads", type=int, default=1100, help="random rows per simulated step")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--data", default=os.environ.get("EXVAE_DATA_DIR", "~/.cache/exvae_dist/data"))
    args = ap.parse_args()
    base = read_idx(Path(args.data).expanduser() / "mnist" / "train-images-idx3-ubyte.gz")[:50_000]
    images = np.resize(base, (args.rows, 28, 28))
    tmp = Path(tempfile.mkdtemp(prefix="layout_"))
    rng = np.random.default_rng(0)
    print(f"N={args.rows}, {args.reads} random rows per read, median of {args.reps}")
    print("| layout | write s | MB on disk | files | random read ms (median) | MB/s of rows asked |")
    print("|---|---|---|---|---|---|")
    try:
        for name, layout in LAYOUTS.items():
            path = tmp / name.replace(" ", "_").replace("/", "")
            t = time.perf_counter()
            store = ExemplarStore.create(path, images, 40, chunk_rows=8192, image_layout=layout)
            write_s = time.perf_counter() - t
            size, files = du(path)
            # Zarr's own read (no cache: every step's random rows are new chunks), or the
            # pread reader for the last layout
            read = store.images
            if "pread" in name:
                reader = open_row_reader(store)
                assert isinstance(reader, RawRows)
                read = reader.read
            times = []
            for _ in range(args.reps):
                rows = rng.choice(args.rows, args.reads, replace=False)
                t = time.perf_counter()
                got = read(rows)
                times.append(time.perf_counter() - t)
                assert np.array_equal(got, images[rows])
            ms = 1000 * statistics.median(times)
            print(f"| {name} | {write_s:.2f} | {size / 1e6:.1f} | {files} | {ms:.1f} | "
                  f"{args.reads * 784 / 1e6 / (ms / 1000):.1f} |", flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

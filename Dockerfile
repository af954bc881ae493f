# exvae-dist in an image: the README's two commands, CPU by default.
#
#   docker build -t exvae-dist .                                   # CPU (torch CPU build, faiss-cpu)
#   docker build -t exvae-dist:gpu --build-arg EXTRAS=gpu,test \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple .       # GPU (CUDA torch, faiss-gpu)
#
#   docker run --rm -v $PWD/../shared/data:/data -v $PWD/runs:/app/runs exvae-dist
#   docker run --rm -v $PWD/../shared/data:/data exvae-dist python -m pytest -q
#
# The data folder is mounted, not baked in (EXVAE_DATA_DIR=/data; without it MNIST is
# downloaded with checksums). Runs land in /app/runs: mount it to keep them.
FROM python:3.11-slim

# cpu,test (default) | gpu,test (faiss-gpu instead of faiss-cpu: both provide `faiss`).
ARG EXTRAS=cpu,test
ARG TORCH_VERSION=2.13.0
# Where torch comes from: PyPI's Linux wheels are CUDA builds (several GB); the CPU index
# holds the CPU build. GPU images pass https://pypi.org/simple (or a CUDA index).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    EXVAE_DATA_DIR=/data \
    PATH=/app/.venv/bin:$PATH

WORKDIR /app
# Only what the package, its tests and benchmarks need: never a host .venv or runs/.
COPY pyproject.toml README.md ./
COPY scripts scripts
COPY exvae_dist exvae_dist
COPY configs configs
COPY tests tests
COPY bench/*.py bench/README.md bench/
COPY cluster cluster
COPY docs docs

# torch first from the chosen index, so that setup.sh's `pip install torch==X` finds it
# installed and pulls nothing; then setup.sh installs the project with the extras.
RUN python -m venv .venv \
    && .venv/bin/pip install -q --upgrade pip \
    && .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && EXVAE_EXTRAS="${EXTRAS}" TORCH_VERSION="${TORCH_VERSION}" bash scripts/setup.sh

# Ray's dashboard / job server (8265), GCS (6379), client server (10001) when this image is a
# cluster node (cluster/ray-cluster.yaml, cluster/rayjob.yaml).
EXPOSE 8265 6379 10001

# README command 1 (the default job); command 2: `python -m pytest -q`.
CMD ["python", "-m", "exvae_dist.train"]

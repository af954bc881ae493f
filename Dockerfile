# exvae-dist in an image: the README's two commands, CPU by default.
#
#   docker build -t exvae-dist .                                   # CPU (torch CPU build, faiss-cpu)
#   docker build -t exvae-dist:gpu --build-arg FAISS=gpu \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple .       # GPU (CUDA torch, faiss-gpu)
#
#   docker run --rm -v $PWD/../shared/data:/data:ro -v $PWD/runs:/app/runs exvae-dist
#   docker run --rm -v $PWD/../shared/data:/data:ro exvae-dist python -m pytest -q
#
# The data folder is mounted, not baked in (EXVAE_DATA_DIR=/data; without it MNIST is
# downloaded with checksums). Runs land in /app/runs: mount it to keep them.
#
# Build arguments for machines without Docker Hub or direct PyPI access (scripts/check_docker.sh
# uses all three):
#   BASE_IMAGE       any image with python3.11 + venv as `python` (default python:3.11-slim;
#                    e.g. a `debootstrap` Debian bookworm imported with `docker import`)
#   CA_BUNDLE        a CA bundle file inside the build context that pip must trust (a
#                    TLS-intercepting proxy); used during the build only, not kept in the image
#   TORCH_WHEELS     a folder inside the build context holding the torch wheel; default: the
#                    CPU wheel from TORCH_INDEX_URL
ARG BASE_IMAGE=python:3.11-slim
# Stage 1 installs; the image (stage 2) copies /app only, so the build inputs (CA bundle,
# torch wheel) stay out of its layers.
FROM ${BASE_IMAGE} AS build

ARG FAISS=cpu
ARG EXTRAS=test
ARG TORCH_VERSION=2.13.0
# Where torch comes from: PyPI's Linux wheels are CUDA builds (several GB); the CPU index
# holds the CPU build. GPU images pass https://pypi.org/simple (or a CUDA index).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CA_BUNDLE=
ARG TORCH_WHEELS=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    EXVAE_DATA_DIR=/data \
    PATH=/app/.venv/bin:$PATH

WORKDIR /app
# Build-only inputs: the CA bundle and the torch wheel folder, when given (pyproject.toml
# stands in when not, so the COPY always has a source; it is ignored then).
COPY ${CA_BUNDLE:-pyproject.toml} /tmp/build/ca-bundle.crt
COPY ${TORCH_WHEELS:-pyproject.toml} /tmp/build/wheels/
# Dependencies first, in their own layer: setup.sh installs the project (editable) from
# pyproject.toml and a stub package, so changing the code does not reinstall the stack.
COPY pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
# torch first (local wheel or the chosen index), so that setup.sh's `pip install torch==X`
# finds it installed and pulls nothing; then setup.sh installs the project.
RUN set -eu; \
    if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT=/tmp/build/ca-bundle.crt; fi; \
    mkdir -p exvae_dist && touch exvae_dist/__init__.py README.md; \
    python -m venv .venv; \
    .venv/bin/pip install -q --upgrade pip; \
    wheel=$(ls /tmp/build/wheels/torch-${TORCH_VERSION}*.whl 2>/dev/null | head -n 1 || true); \
    if [ -n "${TORCH_WHEELS}" ] && [ -n "$wheel" ]; then \
        .venv/bin/pip install -q "$wheel"; \
    else \
        .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi; \
    EXVAE_EXTRAS="${EXTRAS}" EXVAE_FAISS="${FAISS}" TORCH_VERSION="${TORCH_VERSION}" \
        bash scripts/setup.sh; \
    rm -rf /tmp/build /root/.cache
# The code, tests, configs and docs (.dockerignore keeps host venvs, runs and data out).
COPY README.md ./
COPY .ci .ci
COPY scripts scripts
COPY exvae_dist exvae_dist
COPY configs configs
COPY tests tests
COPY bench/*.py bench/README.md bench/
COPY cluster cluster
COPY docs docs

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    EXVAE_DATA_DIR=/data \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY --from=build /app /app

# Ray's dashboard / job server (8265), GCS (6379), client server (10001) when this image is a
# cluster node (cluster/ray-cluster.yaml, cluster/rayjob.yaml).
EXPOSE 8265 6379 10001

# README command 1 (the default job); command 2: `python -m pytest -q`.
CMD ["python", "-m", "exvae_dist.train"]

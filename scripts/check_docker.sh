#!/usr/bin/env bash
# Builds the Docker image and runs the test suite inside it, end to end (not part of CI).
#
#   bash scripts/check_docker.sh                # Docker Hub + PyPI reachable: defaults
#   EXVAE_DOCKER_OFFLINE_BASE=1 bash scripts/check_docker.sh
#       # no Docker Hub: make the base image with debootstrap (Debian bookworm, python3.11)
#
# Environment (all optional):
#   IMAGE            tag to build (exvae-dist:check)
#   BASE_IMAGE       base image (python:3.11-slim; with EXVAE_DOCKER_OFFLINE_BASE=1 an
#                    imported debootstrap image, exvae-base:bookworm, made if missing)
#   CA_BUNDLE_FILE   CA bundle pip must trust in the build (e.g. a TLS-intercepting proxy's:
#                    /etc/ssl/certs/ca-certificates.crt); copied into .docker-build/
#   TORCH_WHEEL      a local torch wheel file (else the CPU index); copied into .docker-build/
#   DATA_DIR         datasets to mount read-only at /data (default $EXVAE_DATA_DIR, else
#                    ../shared/data)
#   PYTEST_ARGS      what the container runs (default: -q, the whole suite)
# Needs a running dockerd; builds with --network host (pip), tests run with --network none.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-exvae-dist:check}
DATA_DIR=$(cd "${DATA_DIR:-${EXVAE_DATA_DIR:-../shared/data}}" && pwd)
[ -d "$DATA_DIR/mnist" ] || { echo "no mnist/ in $DATA_DIR: set DATA_DIR to the datasets folder" >&2; exit 2; }
args=()
if [ "${EXVAE_DOCKER_OFFLINE_BASE:-0}" = 1 ]; then
  BASE_IMAGE=${BASE_IMAGE:-exvae-base:bookworm}
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    root=$(mktemp -d)
    echo "== base image $BASE_IMAGE: debootstrap bookworm into $root"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      bookworm "$root" >/dev/null
    tar -C "$root" -c . | docker import - "$BASE_IMAGE"
    rm -rf "$root"
  fi
fi
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
rm -rf .docker-build && mkdir -p .docker-build/wheels
if [ -n "${CA_BUNDLE_FILE:-}" ]; then
  cp "$CA_BUNDLE_FILE" .docker-build/ca-bundle.crt
  args+=(--build-arg CA_BUNDLE=.docker-build/ca-bundle.crt)
fi
if [ -n "${TORCH_WHEEL:-}" ]; then
  cp "$TORCH_WHEEL" .docker-build/wheels/
  args+=(--build-arg TORCH_WHEELS=.docker-build/wheels)
fi
echo "== docker build -t $IMAGE ${args[*]} (network host)"
start=$(date +%s)
docker build --network host -t "$IMAGE" "${args[@]}" .
echo "== built $IMAGE in $(( $(date +%s) - start )) s; $(docker image inspect -f '{{.Size}}' "$IMAGE" \
  | awk '{printf "%.2f GB", $1 / 1e9}')"
rm -rf .docker-build
docker run --rm --network none "$IMAGE" python -c \
  'import exvae_dist, faiss, torch, ray, mlflow; print("imports ok: torch", torch.__version__, "faiss", faiss.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)'
echo "== tests in the container (data $DATA_DIR read-only at /data, no network)"
start=$(date +%s)
docker run --rm --network none --shm-size 2g -v "$DATA_DIR:/data:ro" -e EXVAE_DATA_DIR=/data \
  -e RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 -e RAY_AUTH_MODE=disabled -e RAY_USAGE_STATS_ENABLED=0 \
  "$IMAGE" python -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider
echo "== tests passed in the container in $(( $(date +%s) - start )) s"

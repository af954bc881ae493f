"""Fail fast on inputs that cannot work, in seconds and before Ray or training starts.

Ray Train V2 retries every error a worker raises (its DefaultFailurePolicy treats each
WorkerGroupError as retryable, up to FailureConfig.max_failures, and there is no public hook
for another policy), so a deterministic failure inside a worker costs max_failures + 1
attempts. What can be known up front is therefore checked here, on the driver:

- check_config(cfg): N or M too small for the exemplar prior's leave-one-out mixture (and a
  warning for bfloat16 on a CPU that only emulates it).
- check_cluster(cfg): more workers than a cluster without an autoscaler can ever place
  (call it after connecting to Ray, before the trainer).
"""

from __future__ import annotations

import logging

from ..config import ConfigError, ExperimentConfig
from ..core.candidates import subset_size

log = logging.getLogger(__name__)


class PreflightError(ConfigError):
    """A run that cannot work as configured; the message names the cause and the fix."""


def check_config(cfg: ExperimentConfig) -> None:
    """Refuses an exemplar prior whose leave-one-out mixture would be empty.

    The prior of training image i is a mixture over the exemplars of a subset of size M
    other than i (METHOD.md): it needs N >= 2 exemplars and M >= 2 (M = 1 leaves nothing
    whenever the one drawn is i itself). The loss would be inf and the run would die with
    "non-finite loss" instead of this message.
    """
    warn_emulated_bf16(cfg)
    if cfg.prior.kind != "exemplar":
        return
    n, what = cfg.data.n_train, f"data.n_train={cfg.data.n_train}"
    if cfg.data.name == "store" and cfg.data.store:
        stored = _store_rows(cfg.data.store)
        if stored is not None and (n is None or stored < n):
            n, what = stored, f"data.store={cfg.data.store} holds {stored} training images"
    if n is not None and n < 2:
        raise PreflightError(
            f"{what}: the exemplar prior of each training image is a leave-one-out "
            f"mixture over the OTHER training images, so it needs at least 2 (use more "
            f"images, or prior.kind=gaussian)")
    m = cfg.prior.subsample
    if m is None and n is not None:
        m = subset_size(n, None)  # the default, as step.PriorSampler computes it
        key = f"prior.subsample (default N // 2 = {m}, as {what})"
    else:
        key = f"prior.subsample={m}"
    if m is not None and m < 2:
        raise PreflightError(
            f"{key}: a leave-one-out mixture over a subset of M={m} exemplar is empty whenever "
            f"that exemplar is the image itself; set prior.subsample >= 2 (and use at least 4 "
            f"training images for the default N // 2)")


def _store_rows(path) -> int | None:
    """The training images of an ingested store (read from its attributes), or None when it
    cannot be opened: the run folder's check names that problem."""
    from pathlib import Path

    from ..retrieval.store import ExemplarStore  # Zarr only for store runs

    try:
        return ExemplarStore(Path(path).expanduser()).n
    except (OSError, ValueError):
        return None


def warn_emulated_bf16(cfg: ExperimentConfig) -> None:
    """bfloat16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX) is emulated:
    a RAT step measured 4.8x SLOWER than float32 on an AVX2-only AMD EPYC (bench/README.md).
    A warning, not a refusal: the results are the same, only slower."""
    wants = cfg.train.exemplar_precision == "bfloat16" or \
        cfg.prior.search_precision == "bfloat16"
    if not wants or cfg.train.device != "cpu":
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return  # not Linux: nothing to tell from
    if flags and not {"avx512_bf16", "amx_bf16"} & set(flags):
        log.warning("bfloat16 (train.exemplar_precision / prior.search_precision) on a CPU "
                    "without AVX512-BF16 or AMX: it is emulated here and slower than float32 "
                    "(bench/README.md measured 4.8x); leave both at float32 on this machine")


def check_cluster(cfg: ExperimentConfig) -> None:
    """Refuses more workers than the connected Ray cluster can ever place.

    Reads ray.cluster_resources() (call after ray.init, before the trainer). A Ray started
    by this process or the caller (no ray.address) has no autoscaler, so what it has now is
    all it will ever have; on a cluster given by address an autoscaler may add nodes, so
    there a shortfall is only warned about (driver.check_resources).
    """
    import ray

    if cfg.ray.address:
        return
    have = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise PreflightError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker="
            f"{cfg.ray.cpus_per_worker} need {need_cpu:g} CPUs, but this Ray (local, no "
            f"autoscaler) has {have.get('CPU', 0):g}: the workers could never start and Ray "
            f"Train would retry forever. Lower ray.num_workers or ray.cpus_per_worker, or "
            f"connect to a larger cluster with ray.address")
    if cfg.ray.use_gpu and cfg.ray.num_workers > have.get("GPU", 0):
        raise PreflightError(
            f"ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers}, but this Ray "
            f"(local, no autoscaler) has {have.get('GPU', 0):g} GPUs: lower ray.num_workers "
            f"or set ray.use_gpu=false")

"""Shared fixtures: real data from ../shared/data, and a loopback-only local Ray."""

import os
from pathlib import Path

import pytest

# Keep Ray on loopback, without token auth or usage reporting (see STACK_NOTES.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

REPO = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    env = os.environ.get("EXVAE_DATA_DIR")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "mnist").is_dir():
        pytest.fail(f"real data not found at {path}: set EXVAE_DATA_DIR to the shared/data folder")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, bound to 127.0.0.1, 2 CPUs."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # its processes get a state API address nobody serves: unpointed, Ray Train's
        # PlacementGroupCleaner would ask other Rays on the machine (test_local_ray.py)
        from exvae_dist.train.driver import start_local_ray_without_dashboard

        start_local_ray_without_dashboard(2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# The longest files first, so that with two pytest-xdist processes (pyproject's addopts,
# --dist loadfile deals out whole files in collection order) the README test (~5 min) and
# the Ray trainer tests (~4 min) start at once, beside each other, and the short files fill
# in around them; otherwise the README test, collected late, runs alone at the end.
LONGEST_FIRST = ("test_readme.py", "test_train_ray.py", "test_two_nodes.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = Path(str(item.fspath)).name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept

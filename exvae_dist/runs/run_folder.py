"""Run folders that are safe to rerun: a fingerprint of what defines a run, checked first.

A run folder (`train.run_dir/<run name>/`) resumes when the same command runs again. That
is only right when the rerun trains the same thing, so the first start writes
`fingerprint.json`: the values of the IDENTITY keys (data, model, prior, optimisation). A
rerun compares them before Ray, data loading or anything expensive starts:

- they match: resume (epochs, evaluation, tracking, workers may differ: they do not change
  what is being trained);
- they differ: stop with a RunFolderError that names each key (old -> new) and the three
  ways on: `train.allow_changed=true` (resume with the new settings; not possible for the
  STRUCTURAL keys, whose checkpoint or exemplar store cannot be reused), a new `train.name`,
  or `train.overwrite=true` (the old folder is moved aside to `<name>.replaced-<UTC time>`,
  never deleted: results are not ours to throw away).

Also refused: a run folder inside Ray's temporary copy of a job's working dir
(`ray job submit --working-dir`), which Ray deletes after the job.

    folder = prepare(cfg)    # entry points, before Ray starts
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf

from .. import config as config_mod
from ..common.jsonio import read_json, write_json, write_text_atomic
from .run_lock import LOCK_NAME

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
CONFIG_RECORD = "config.yaml"

# What defines a run: changing any of these changes what is trained. Everything else
# (train.epochs, early stopping, eval.*, tracking.*, ray.*, index.* search settings, paths,
# threads, device, progress) may change between the attempts of one run.
IDENTITY: dict[str, Optional[tuple[str, ...]]] = {
    # store_fingerprint: the content of data.store (prepare() reads it from the store), so a
    # store moved to another path still resumes and another store's data never does
    "data": ("name", "n_train", "n_valid", "binarize_seed", "labels", "pixels",
             "store_fingerprint"),
    "model": None,  # every key
    "prior": None,
    "train": ("batch_size", "lr", "lr_schedule", "normalize_grads", "warmup_epochs", "seed",
              "max_steps_per_epoch"),
}
# Identity keys that no checkpoint can survive: the network's shapes, the prior's parameters
# and the exemplar set (the store and the sampler hold one row per training image).
STRUCTURAL = ("data.name", "data.n_train", "data.labels", "data.store_fingerprint",
              "model.arch", "model.z_dim", "model.hidden", "prior.kind", "prior.n_pseudo")
# Keys whose None in a record means "not recorded" (runs from before it was recorded), not
# a value: such a record is not compared on them.
NONE_IS_UNRECORDED = ("data.store_fingerprint",)
# A recorded value that cannot be known (a key an old fingerprint.json predates, with an
# unreadable config.yaml): not compared, rather than compared against the defaults.
UNRECORDED = object()
# Files of trained state: a folder with none of them holds nothing a new attempt could lose.
TRAINED_STATE = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt", "checkpoint_*",
                 "checkpoint_manager_snapshot.json")


class RunFolderError(config_mod.ConfigError):
    """The run folder cannot be used as asked; the message names the keys and the fix."""


@dataclasses.dataclass
class RunFolder:
    path: Path
    fingerprint: dict[str, Any]
    resumed: bool  # the folder held this run already (same fingerprint, or allow_changed)
    changed: dict[str, tuple[Any, Any]]  # key -> (recorded, now), accepted by allow_changed
    moved_to: Optional[Path] = None  # where train.overwrite=true put the old folder


def fingerprint(cfg: config_mod.ExperimentConfig) -> dict[str, Any]:
    """The IDENTITY values of `cfg`, as {"section.key": value}."""
    out: dict[str, Any] = {}
    for section, keys in IDENTITY.items():
        values = dataclasses.asdict(getattr(cfg, section))
        for key in (keys if keys is not None else values):
            out[f"{section}.{key}"] = values[key]
    if cfg.train.lr_schedule != "constant":  # the schedule's length sets every epoch's rate
        out["train.epochs"] = cfg.train.epochs
    return out


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple]:
    """Keys whose value differs, as key -> (recorded, now); a key only one side knows (a run
    recorded by an older version) counts when its value is not the default's."""
    defaults = fingerprint(config_mod.ExperimentConfig())
    out = {}
    for key in sorted(set(recorded) | set(now)):
        if key in config_mod.REMOVED_KEYS:  # a lever that no longer exists: only "off" resumes
            if recorded[key] != config_mod.REMOVED_KEYS[key]:
                out[key] = (recorded[key], "removed")
            continue
        old = recorded.get(key, defaults.get(key))
        new = now.get(key, defaults.get(key))
        if old is UNRECORDED or (old is None and key in NONE_IS_UNRECORDED):
            continue
        if old != new:
            out[key] = (old, new)
    return out


def temporary_working_dir(path: Path) -> Optional[str]:
    """Why `path` lies in a folder Ray deletes (a job's uploaded working dir), or None.

    Ray unpacks a job's `--working-dir` under `<ray temp>/session_*/runtime_resources/
    working_dir_files/_ray_pkg_<hash>/` and runs the entrypoint there, so a relative
    train.run_dir lands in it and disappears with the session. A session folder is known by
    its name and the `session_latest` link Ray keeps beside it (even one left dangling),
    wherever the temp dir is (RAY_TMPDIR, --temp-dir): no environment is read here. Where Ray
    could not make that link, only the job's working dir itself is recognised."""
    resolved = Path(path).resolve()
    if "runtime_resources" in resolved.parts or any(p.startswith("_ray_pkg_")
                                                    for p in resolved.parts):
        return "it lies inside the working dir Ray unpacked for this job"
    for folder in (resolved, *resolved.parents):  # resolve() followed session_latest itself
        if folder.name.startswith("session_") and os.path.lexists(folder.parent /
                                                                   "session_latest"):
            return f"it lies inside Ray's session folder {folder}"
    return None


# Where a run goes when its default train.run_dir (./runs) would lie in a Ray job's temporary
# working dir: RAY_STORAGE (the cluster's storage path, as Ray Train reads it) where set, else
# this folder (Ray Train's own default is ~/ray_results, for the same reason)
PERSISTENT_RUN_DIR = "~/exvae_runs"


def run_dir_given(config: Optional[str | os.PathLike], overrides=()) -> bool:
    """Whether the user chose train.run_dir: an override, or the --config file, sets it."""
    if "train.run_dir" in config_mod.override_keys(overrides):
        return True
    if config is None:
        return False
    layer = OmegaConf.load(config_mod.resolve_config_path(config))
    return OmegaConf.select(layer, "train.run_dir", default=None) is not None


def outside_job_dir(cfg: config_mod.ExperimentConfig, given: bool,
                    env: Mapping[str, str]) -> config_mod.ExperimentConfig:
    """cfg, or when its run folder would lie in a folder Ray deletes (temporary_working_dir)
    and the user did not set train.run_dir (`given`): cfg with train.run_dir the persistent
    default ($RAY_STORAGE, else PERSISTENT_RUN_DIR), announced on stdout (a job's output).
    A run_dir the user set is left as it is, for prepare() to refuse. `env`: the entry
    point's environment (its RAY_STORAGE)."""
    if given or temporary_working_dir(cfg.run_path()) is None:
        return cfg
    storage = env.get("RAY_STORAGE") or ""
    root = storage if storage and "://" not in storage else PERSISTENT_RUN_DIR
    root = str(Path(root).expanduser().resolve())
    default = cfg.train.run_dir
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=root))
    print(f"run folder: {cfg.run_path()} (train.run_dir was not set and {default}/ would lie "
          f"in the job's temporary working dir, which Ray deletes; set train.run_dir to "
          f"choose another)", flush=True)
    return cfg


def prepare(cfg: config_mod.ExperimentConfig, now: Optional[float] = None) -> RunFolder:
    """Checks and claims cfg.run_path() before any expensive work; returns the RunFolder.

    Fresh folder: writes fingerprint.json. Existing run with the same fingerprint: resumes.
    Different fingerprint: RunFolderError, unless train.overwrite (old folder moved aside,
    fresh start) or train.allow_changed (resume; the change is appended to the record).
    Writes config.yaml (the settings of this attempt) in every case that goes on.
    """
    path = cfg.run_path()
    why = temporary_working_dir(path)
    if why:
        raise RunFolderError(
            f"train.run_dir={cfg.train.run_dir} puts the run at {path}, but {why}, which Ray "
            f"deletes when the job ends: the checkpoints and results would be lost. Pass an "
            f"absolute train.run_dir outside it (e.g. train.run_dir=$PWD/runs expanded by "
            f"the submitting shell, or a folder every node shares such as /shared/runs)")
    _pin_store(cfg)
    now_fp = fingerprint(cfg)
    recorded = _recorded(path)
    moved_to, changed, resumed = None, {}, False
    if recorded is not None:
        changed = differences(recorded, now_fp)
        if changed and not cfg.train.overwrite and not _holds_trained_state(path):
            moved_to = _move_aside(path, now)
            log.warning("%s holds no checkpoint (its attempt stopped before the first one) and "
                        "other settings (%s): moved it to %s and starting afresh", path,
                        _listing(changed), moved_to)
            changed = {}
        elif cfg.train.overwrite:
            moved_to = _move_aside(path, now)
            log.warning("train.overwrite=true: moved the old run folder %s to %s and starting "
                        "over", path, moved_to)
            changed = {}
        elif not changed:
            resumed = True
        elif cfg.train.allow_changed:
            structural = [k for k in changed if k in STRUCTURAL]
            if structural:
                raise RunFolderError(_message(cfg, path, changed, structural))
            resumed = True
            log.warning("train.allow_changed=true: resuming %s with changed settings: %s",
                        path, _listing(changed))
        else:
            raise RunFolderError(_message(cfg, path, changed,
                                          [k for k in changed if k in STRUCTURAL]))
    path.mkdir(parents=True, exist_ok=True)
    history = (read_json(path / FINGERPRINT).get("changes", [])
               if resumed and (path / FINGERPRINT).is_file() else [])
    if changed:
        history.append({"time": _utc(now), "changed": {k: {"was": a, "now": b}
                                                       for k, (a, b) in changed.items()}})
    write_json(path / FINGERPRINT, {"fingerprint": now_fp, "changes": history,
                                    "identity_keys": sorted(now_fp)})
    write_text_atomic(path / CONFIG_RECORD, config_mod.to_yaml(cfg))
    return RunFolder(path=path, fingerprint=now_fp, resumed=resumed, changed=changed,
                     moved_to=moved_to)


def _pin_store(cfg: config_mod.ExperimentConfig) -> None:
    """data.name=store: fills data.store_fingerprint from the store (a cheap read of its
    attributes) before the fingerprint is taken and config.yaml written, so both record which
    data the run trains on; a missing, half-written or other store fails here, before
    anything starts."""
    if cfg.data.name != "store" or not cfg.data.store:
        return
    from ..retrieval.store_ingest import ingested_fingerprint  # Zarr only for store runs

    try:
        found = ingested_fingerprint(cfg.data.store)
    except (OSError, ValueError) as err:  # missing, half-written, corrupt, unreadable
        raise RunFolderError(f"data.store={cfg.data.store} cannot be used: {err}") from None
    if cfg.data.store_fingerprint is None:
        cfg.data.store_fingerprint = found
    elif cfg.data.store_fingerprint != found:
        raise RunFolderError(f"data.store={cfg.data.store} holds store {found}, not the "
                             f"data.store_fingerprint={cfg.data.store_fingerprint} asked for: "
                             f"point data.store at that store, or drop data.store_fingerprint")


def _holds_trained_state(path: Path) -> bool:
    return any(next(path.glob(pattern), None) is not None for pattern in TRAINED_STATE)


def _recorded(path: Path) -> Optional[dict[str, Any]]:
    """The fingerprint a folder records: fingerprint.json (keys it predates filled from its
    config.yaml), else (a run from before fingerprints) its config.yaml; None for a folder
    that holds no run."""
    if (path / FINGERPRINT).is_file():
        try:
            recorded = dict(read_json(path / FINGERPRINT)["fingerprint"])
        except (ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{path / FINGERPRINT} is unreadable ({err}): restore it, "
                                 f"or start over with train.overwrite=true") from None
        missing = set(fingerprint(config_mod.ExperimentConfig())) - set(recorded)
        if missing and (path / CONFIG_RECORD).is_file():
            try:  # identity keys added since the run was recorded: its config.yaml says
                from_yaml = _fingerprint_of_yaml(path / CONFIG_RECORD)
                recorded.update({k: from_yaml[k] for k in missing})
            except RunFolderError:
                recorded.update({k: UNRECORDED for k in missing})
        return recorded
    if (path / CONFIG_RECORD).is_file():
        return _fingerprint_of_yaml(path / CONFIG_RECORD)
    return None


def _fingerprint_of_yaml(record: Path) -> dict[str, Any]:
    try:
        old = config_mod.from_dict(OmegaConf.to_container(OmegaConf.load(record)))
    except Exception as err:  # a config from another version: keys renamed or removed
        raise RunFolderError(f"{record.parent} holds a run whose {record.name} this version "
                             f"cannot read ({str(err).splitlines()[0]}): pick a new train.name "
                             f"or start over with train.overwrite=true") from None
    return fingerprint(old)


def _move_aside(path: Path, now: Optional[float]) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    path.rename(target)
    lock = target / LOCK_NAME
    if lock.is_file():  # this attempt's own lock (run_lock.exclusive_run takes it first)
        path.mkdir(parents=True, exist_ok=True)
        try:  # a link fails where another start took the new folder's lock meanwhile
            os.link(lock, path / LOCK_NAME)
        except FileExistsError:
            raise RunFolderError(f"another start took {path} while this one moved the old "
                                 f"folder to {target}: let that one run") from None
        lock.unlink()  # the lock stays with the run it guards
    return target


def _listing(changed: Mapping[str, tuple]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())


def _message(cfg, path: Path, changed: Mapping[str, tuple], structural: list[str]) -> str:
    lines = [f"{path} holds a run trained with other settings: {_listing(changed)}."]
    if structural:
        lines.append(f"{', '.join(structural)} cannot change in a resumed run (the checkpoint "
                     f"and exemplar store have other shapes), so train.allow_changed=true does "
                     f"not apply.")
    if "data.store_fingerprint" in changed:
        lines.append("data.store holds other images than this run was trained on: point it "
                     "at the run's own store to resume.")
    lines.append("Pick one:")
    if not structural:
        lines.append("  train.allow_changed=true   resume this run with the new settings "
                     "(recorded in fingerprint.json)")
    lines.append(f"  train.name=<new name>      a separate run next to it (now "
                 f"train.name={cfg.run_name()})")
    lines.append(f"  train.overwrite=true       start over; the old folder is moved to "
                 f"{path.name}.replaced-<UTC time>")
    return "\n".join(lines)


def _utc(now: Optional[float]) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))

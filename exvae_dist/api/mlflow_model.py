"""A trained run's checkpoint as an MLflow model (an MLflow 3 LoggedModel of the pyfunc flavour).

    info = log_model(ExemplarVAE.load("runs/smoke"))      # into the run's own MLflow run
    mlflow.pyfunc.load_model(info.model_uri).predict(images)        # log p(x) per image
    mlflow.pyfunc.load_model(uri).predict(images, params={"output": "sample", "n": 16})
    ExemplarVAE.load(info.model_uri)                                # models:/m-... too

The model's files: the torch checkpoint (best.pt, with the config), the same weights as
safetensors (best.safetensors, also written beside the checkpoint in the run folder), the
exemplar set in use (exemplars.npz: uint8 images, encoder means, labels), and an input example
of two exemplar images. The trainers log the best checkpoint this way at the end of a run
with tracking enabled (cli.py, api.fit).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import mlflow
import mlflow.pyfunc
import numpy as np

log = logging.getLogger(__name__)

PARAMS = {"output": "log_prob", "n_samples": 0, "n": 0, "seed": 0}
# exemplar sets up to this many bytes of images travel inside the model (exemplars.npz);
# a larger ingested store is pointed to instead (exemplars.json: the run's data.store, read
# where it is when the model is loaded)
INLINE_BYTES = 1 << 30


class ExemplarVAEModel(mlflow.pyfunc.PythonModel):
    """predict(images [B, D] or [B, C, H, W]): log p(x) in nats per image (params n_samples:
    importance samples, 0 = the run's eval.n_samples); params={"output": "sample", "n": n,
    "seed": s}: n images [n, D] drawn from the prior."""

    def load_context(self, context):
        from exvae_dist.api.model import ExemplarVAE

        self.vae = ExemplarVAE.load(Path(context.artifacts["checkpoint"]).parent)

    def predict(self, context, model_input, params=None):
        p = {**PARAMS, **(params or {})}
        if p["output"] == "sample":
            images, _ = self.vae.sample(int(p["n"]) or 1, seed=int(p["seed"]))
            return images.reshape(len(images), -1)
        if p["output"] != "log_prob":
            raise ValueError(f"params output={p['output']!r}: log_prob or sample")
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        return np.asarray(self.vae.log_prob(np.asarray(x), n_samples=int(p["n_samples"]) or None,
                                            seed=int(p["seed"])), dtype=np.float64).reshape(-1)


def write_safetensors(vae, path: Optional[Path] = None) -> Path:
    """The model's weights as safetensors (default: beside its checkpoint, best.safetensors)."""
    from safetensors.torch import save_file

    from ..common.jsonio import dumps

    path = Path(path or Path(vae.trained.checkpoint).with_suffix(".safetensors"))
    state = {k: v.detach().cpu().contiguous() for k, v in vae.model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"config": dumps(_config_dict(vae)),
                                         "image_shape": dumps(list(vae.image_shape))})
    tmp.replace(path)
    return path


def _config_dict(vae) -> dict:
    from .. import config as config_mod

    return config_mod.to_dict(vae.config)


def exemplars_inline(vae) -> bool:
    """Whether the exemplar set goes inside the model (INLINE_BYTES), without reading it."""
    cfg = vae.config
    if cfg.data.name != "store":
        return True  # a named dataset: at most Omniglot's or MNIST's tens of thousands
    from ..retrieval.store import ExemplarStore

    n = ExemplarStore(Path(cfg.data.store).expanduser()).n
    return n * int(np.prod(vae.image_shape)) <= INLINE_BYTES


def write_exemplars(vae, path: Path) -> Path:
    ex = vae.exemplar_set
    from ..common.levels import to_bytes

    np.savez(path, images=to_bytes(ex.images),
             latents=ex.latents if ex.latents is not None else np.empty(0, np.float32),
             labels=ex.labels if ex.labels is not None else np.empty(0, np.int64),
             version=np.asarray(ex.version), description=np.asarray(ex.description))
    return path


@contextlib.contextmanager
def _quiet():
    """Without MLflow's advice that does not apply here: type hints on predict (the signature
    is given) and models-from-code instead of a pickled PythonModel (ours is a small class
    of an installed package)."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        pyfunc_log.setLevel(level)


def log_model(vae, registered_model_name: Optional[str] = None, name: str = "model"):
    """Logs vae (its checkpoint, weights as safetensors, exemplar set, config) as an MLflow
    model into its run's MLflow run (mlflow_run.json in the run folder; a new run of
    tracking.experiment when there is none); returns MLflow's ModelInfo (model_uri
    models:/m-...; registered as `registered_model_name` when given)."""
    import shutil

    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from ..common.jsonio import dumps, read_json
    from ..runs.tracking import RUN_FILE, default_uri, store_lock

    run_path = Path(vae.trained.path)
    saved = read_json(run_path / RUN_FILE) if (run_path / RUN_FILE).is_file() else {}
    uri = saved.get("uri") or vae.config.tracking.uri or default_uri(run_path.parent)
    safetensors = write_safetensors(vae)
    inline = exemplars_inline(vae)
    example = (vae.exemplar_set.images[:2].astype(np.float32) if inline
               else np.zeros((2, int(np.prod(vae.image_shape))), np.float32))
    signature = infer_signature(example, np.zeros(len(example)), params=PARAMS)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "best.pt"
            shutil.copyfile(vae.trained.checkpoint, ckpt)
            files = {"checkpoint": str(ckpt),
                     "safetensors": str(shutil.copyfile(safetensors,
                                                        Path(tmp) / "best.safetensors"))}
            if inline:
                files["exemplars"] = str(write_exemplars(vae, Path(tmp) / "exemplars.npz"))
            else:
                pointer = Path(tmp) / "exemplars.json"
                pointer.write_text(dumps({"data.store": vae.config.data.store,
                                          "data.store_fingerprint":
                                              vae.config.data.store_fingerprint,
                                          "eval.exemplars": vae.config.eval.exemplars}))
                files["exemplars"] = str(pointer)
            client = MlflowClient(uri)
            run_id = saved.get("run_id")
            status = client.get_run(run_id).info.status if run_id else None
            with store_lock(uri):
                if run_id is None:
                    mlflow.set_experiment(vae.config.tracking.experiment)
                with mlflow.start_run(run_id=run_id, run_name=run_path.name), _quiet():
                    info = mlflow.pyfunc.log_model(
                        name=name, python_model=ExemplarVAEModel(), artifacts=files,
                        signature=signature, input_example=example,
                        pip_requirements=["exvae-dist", "torch", "numpy", "safetensors"],
                        registered_model_name=registered_model_name)
            if status and status != "RUNNING":  # start_run/end_run leave FINISHED
                client.set_terminated(run_id, status=status)
    finally:
        mlflow.set_tracking_uri(previous)
    log.info("logged %s as MLflow model %s%s", vae.trained.checkpoint, info.model_uri,
             f" (registered as {registered_model_name})" if registered_model_name else "")
    return info

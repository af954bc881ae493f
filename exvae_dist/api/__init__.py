"""The Python API: a trained Exemplar VAE as an object (model.py), training from Python
(training.py) and MLflow models (mlflow_model.py: imported on use, it loads MLflow)."""

from .model import ExemplarVAE, InputShapeError
from .training import fit, train

__all__ = ["ExemplarVAE", "InputShapeError", "fit", "train"]

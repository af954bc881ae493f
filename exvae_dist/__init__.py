"""exvae-dist: Exemplar VAEs with retrieval augmented training, from a laptop to a Ray cluster.

    import exvae_dist
    model = exvae_dist.fit(images, config="smoke")       # or ExemplarVAE.load("runs/smoke")
    images, exemplar_ids = model.sample(16, seed=0)
    log_px = model.log_prob(test_images)

(docs/api.md). The names are imported on first use, so that `import exvae_dist.core.priors` and
the rest of the pure core stay free of the API's imports.
"""

__version__ = "0.1.0"

__all__ = ["ExemplarVAE", "fit", "log_model", "__version__"]


def __getattr__(name: str):
    if name in ("ExemplarVAE", "fit"):
        from . import api

        return getattr(api, name)
    if name == "log_model":  # MLflow loads only when a model is logged
        from .api.mlflow_model import log_model

        return log_model
    raise AttributeError(f"module 'exvae_dist' has no attribute {name!r}")

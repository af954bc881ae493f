"""exvae-dist: Exemplar VAEs with retrieval augmented training, from a laptop to a Ray cluster."""

__version__ = "0.1.0"

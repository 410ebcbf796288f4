"""mlsm-pipeline: Masked Latent Semantic Modeling pre-training, one module per stage (see docs/data-contract.md)."""

__version__ = "0.1.0"

"""mlsm-pipeline: Masked Latent Semantic Modeling pre-training, one module per stage (the data contract between stages: pipeline/contract.py)."""

__version__ = "0.1.0"

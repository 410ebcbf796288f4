"""mlsm-pipeline: Masked Latent Semantic Modeling pre-training, one module per stage.

The stages' interfaces: pipeline/stages.py; the data contract between them: pipeline/contract.py."""

__version__ = "0.1.0"

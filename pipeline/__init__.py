"""mlsm-pipeline: Masked Latent Semantic Modeling pre-training, one module per stage.

The stages are the modules here (python -m pipeline.<stage>); each is declared once, with the rules that run
it, in its home pipeline/wiring/<stage>.py. The data contract between them: pipeline/data/contract.py; the
sparse solvers: pipeline/solvers/; what the report builds on: pipeline/reporting/."""

__version__ = "0.1.0"

"""The paper's toy experiments (docs/theory.md §4): ``python -m lightning_reg.experiments.toy1d`` / ``toy2d``."""

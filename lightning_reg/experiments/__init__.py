"""The paper's toy experiments (REG_NOTES §4): ``python -m lightning_reg.experiments.toy1d`` / ``toy2d``."""

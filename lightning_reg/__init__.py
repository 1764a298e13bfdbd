"""lightning-reg: REG (Rectified Gradient Guidance) for conditional diffusion models."""

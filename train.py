"""Train a class-conditional diffusion model: ``python train.py fit --config configs/toy2d.yaml``."""

from lightning_reg.cli import main

if __name__ == "__main__":
    main()

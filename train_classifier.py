"""Train the digits classifier of the image metrics: ``python train_classifier.py fit --config configs/mnist_classifier.yaml``."""

from lightning_reg.cli import classifier_main

if __name__ == "__main__":
    classifier_main()

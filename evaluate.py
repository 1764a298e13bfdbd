"""Image metrics (FID / IS / KID / class accuracy) of a ``samples.npz`` against reference images, as one
JSON or CSV row: ``python evaluate.py --samples run/samples.npz --reference digits:mnist
--feature_network checkpoints/classifier/mnist16.ckpt --output results.csv``. ``--help`` lists the options.
"""

from lightning_reg.metrics.evaluate import main

if __name__ == "__main__":
    main()

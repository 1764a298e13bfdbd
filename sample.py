"""Sample a trained checkpoint with guidance (and REG): ``python sample.py --config configs/sample_toy2d.yaml``.

See ``docs/sampling.md``; ``python sample.py --help`` lists the options.
"""

from lightning_reg.sampling.cli import main

if __name__ == "__main__":
    main()

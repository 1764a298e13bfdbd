"""Sweep guidance methods x weights x REG modes: ``python sweep.py --config configs/sweep_toy2d.yaml``.

Writes ``sweep.csv`` and ``fronts.png`` to ``--output`` and prints the best settings; see ``docs/sweeps.md``.
``python sweep.py --help`` lists the options.
"""

from lightning_reg.sampling.config import SweepConfig, parse_config  # neither torch nor Lightning

if __name__ == "__main__":
    config = parse_config(SweepConfig)  # --help and bad arguments are answered before the heavy imports
    from lightning_reg.sampling.sweep import run

    run(config)

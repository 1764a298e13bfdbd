"""Sample a trained checkpoint with guidance (and REG): ``python sample.py --config configs/sample_toy2d.yaml``.

See ``docs/sampling.md``; ``python sample.py --help`` lists the options.
"""

import time

STARTED = time.time()  # meta.json's wall_time_s counts from here: imports and start-up included

from lightning_reg.sampling.config import SampleConfig, parse_config  # noqa: E402 - neither torch nor Lightning

if __name__ == "__main__":
    config = parse_config(SampleConfig)  # --help and bad arguments are answered before the heavy imports
    from lightning_reg.sampling.cli import run

    run(config, STARTED)

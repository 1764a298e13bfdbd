"""Lightning's own cost: the training step of ``ConditionalDiffusion`` under ``lightning.Trainer`` against
a plain PyTorch loop over the same UNet, the same batches and the same optimizer.

Both sides start from the same weights, read the same in-memory batches through the same ``DataLoader``
and do the same work per step: the label check, label dropout, the diffusion loss, backward, the
module's AdamW and warm-up schedule (``configure_optimizers``), the EMA update. The Trainer side adds
what Lightning does around it: its fit loop, hooks, ``self.log`` of the loss (no logger, progress bar,
checkpointing or validation: those are costs of what one asks for, not of Lightning). A step is the
interval between the ends of consecutive training batches (a Lightning callback on one side, the
loop's own clock on the other), so data loading and the loop's overhead are inside it. The two sides
alternate in rounds (which goes first alternates too; a new Trainer each round; its first intervals,
and the plain loop's, are dropped as warm-up); the ratio is the median over rounds of the ratio of the round medians.

    python benchmarks/lightning_overhead.py [--device cpu|cuda] [--threads 1] [--rounds 5] [--steps 8]
                                            [--skip 2] [--batch 128] [--image-size 16] [--base-channels 32]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import warnings

import lightning as L
import torch
from common import CLOCKS, plain_optimizer, plain_training_step, synchronize
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.models.unet import UNet
from lightning_reg.module import ConditionalDiffusion


def stamp(device: torch.device) -> dict[str, float]:
    synchronize(device)
    return {clock: now() for clock, now in CLOCKS.items()}


def intervals(stamps: list[dict[str, float]], skip: int) -> dict[str, list[float]]:
    """Per clock, the seconds between consecutive stamps, the first ``skip`` intervals dropped."""
    return {clock: [b[clock] - a[clock] for a, b in zip(stamps, stamps[1:])][skip:] for clock in CLOCKS}


class StepClock(L.Callback):
    """Stamps the end of every training batch (before the module's own hook, so one step apart)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def on_train_batch_end(self, *args) -> None:
        self.stamps.append(stamp(self.device))


def lightning_round(module: ConditionalDiffusion, loader: DataLoader, device: torch.device, skip: int):
    clock = StepClock(device)
    trainer = L.Trainer(max_steps=len(loader), accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, loader)
    return intervals(clock.stamps, skip)


def plain_round(module: ConditionalDiffusion, optimizer, scheduler, loader: DataLoader, device: torch.device,
                skip: int):
    stamps = []
    for x0, y in loader:
        plain_training_step(module, optimizer, scheduler, x0.to(device), y.to(device))
        stamps.append(stamp(device))
    return intervals(stamps, skip)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each loop")
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--skip", type=int, default=2, help="step intervals dropped at the start of each round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--base-channels", type=int, default=32, help="UNet width (channel_mult (1, 2), attn 8)")
    args = parser.parse_args(argv)
    if args.steps - 1 <= args.skip:
        parser.error(f"--steps {args.steps} leaves no timed interval after --skip {args.skip}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available", "TPU available", ...
    warnings.filterwarnings("ignore", message=r".*(validation_step|does not have many workers|LeafSpec).*")

    torch.manual_seed(0)
    net = UNet(num_classes=10, image_size=args.image_size, channels=1, base_channels=args.base_channels)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch
    data = TensorDataset(torch.randn(n, *net.data_shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)  # one epoch = one round
    with_trainer = ConditionalDiffusion(net, lr=1e-4, warmup_steps=100)
    plain = copy.deepcopy(with_trainer).to(device)
    optimizer, scheduler = plain_optimizer(plain)
    run = {"Trainer": lambda: lightning_round(with_trainer, loader, device, args.skip),
           "plain": lambda: plain_round(plain, optimizer, scheduler, loader, device, args.skip)}
    rounds = {name: [] for name in run}
    for r in range(args.rounds):
        for name in sorted(run, reverse=r % 2 == 1):  # which loop goes first alternates with the round
            rounds[name].append(run[name]())

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"training step, UNet b{args.base_channels} (1,2) attn 8 ({params:.2f}M params), "
          f"{args.image_size}x{args.image_size}x1, batch {args.batch}; {args.rounds} rounds x "
          f"{args.steps - 1 - args.skip} timed steps each ({where}, torch {torch.__version__}, "
          f"lightning {L.__version__})")
    print("| loop | wall s/step | wall / plain | CPU s/step | CPU / plain |")
    print("|---|---|---|---|---|")
    for name, per_round in rounds.items():
        cells = []
        for clock in CLOCKS:
            steps = [s for r in per_round for s in r[clock]]
            ratio = statistics.median(statistics.median(a[clock]) / statistics.median(b[clock])
                                      for a, b in zip(per_round, rounds["plain"]))
            cells += [f"{statistics.median(steps):.4f}", f"{ratio:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

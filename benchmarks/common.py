"""What the benchmark scripts share: interleaved timing on a shared machine, and one plain training step.

Every round times each call back to back, so load drifting on a shared machine touches all of them
alike; the reported time is the median over the rounds after warm-up, and a ratio is the median over
rounds of the ratio within a round. Wall-clock and process CPU time are both kept: on a loaded CPU the
CPU time is the stabler measure of compute (exact with one thread; with N threads it also counts the
workers' spinning).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from lightning_reg.module import ConditionalDiffusion

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Bytes ``call`` allocates on ``device`` at its peak, above the resting state (weights excluded)."""
    synchronize(device)
    resting = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - resting


def interleaved_times(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Per call and clock, the seconds of each of ``repeats`` rounds after ``warmup`` untimed ones."""
    times = {name: {clock: [] for clock in CLOCKS} for name in calls}
    for r in range(warmup + repeats):
        for name, call in calls.items():
            synchronize(device)
            start = {clock: now() for clock, now in CLOCKS.items()}
            call()
            synchronize(device)
            if r >= warmup:
                for clock, now in CLOCKS.items():
                    times[name][clock].append(now() - start[clock])
    return times


def medians(times: dict[str, dict[str, list[float]]], reference: str) -> dict[str, dict[str, float]]:
    """Per call: the median ``wall`` and ``cpu`` seconds, and ``<clock>_ratio``, the median over rounds
    of the ratio to ``reference`` within the round."""
    return {name: {key: value for clock, seconds in per_clock.items() for key, value in (
        (clock, statistics.median(seconds)),
        (f"{clock}_ratio", statistics.median(a / b for a, b in zip(seconds, times[reference][clock]))))}
        for name, per_clock in times.items()}


def plain_optimizer(module: ConditionalDiffusion):
    """The module's own AdamW and warm-up schedule (``configure_optimizers``), for a loop without a Trainer."""
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def plain_training_step(module: ConditionalDiffusion, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, x0: Tensor, y: Tensor) -> Tensor:
    """What ``ConditionalDiffusion`` does per batch under a Trainer, without one (and without logging):
    the label check, label dropout, the diffusion loss, backward, the AdamW and schedule steps, the EMA update."""
    module.denoiser.check_labels(y, allow_null=True)
    loss = module.diffusion_loss(module.net, x0, module.drop_labels(y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    module.ema.update_parameters(module.net)
    return loss.detach()
